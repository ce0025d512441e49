"""The PyTorch peer of `bench.step`: the same Qwen2 training step in transformers + PyTorch, timed
the same way, for the side-by-side figures `bench.step --peer=torch` prints.

transformers' `Qwen2ForCausalLM` built from our config (random weights, fp32 master weights),
SDPA attention, bf16 autocast when our side computes in bf16, the next-token cross entropy on the
full logits in fp32 (what a user's loop computes), and AdamW with the fused CUDA implementation on
GPUs (foreach on CPU). Phases are timed with a device synchronization between them; the step
time comes from whole steps without one.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from qwen_jax.model.config import QwenConfig


def step_figures(
    config: QwenConfig, inputs: np.ndarray, targets: np.ndarray, *, steps: int, bf16: bool
) -> dict:
    import torch
    import torch.nn.functional as F
    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM._from_config(
        transformers.Qwen2Config(**config.to_hf_config()),
        attn_implementation="sdpa",
        torch_dtype=torch.float32,
    ).to(device)
    model.train()
    fused = {"fused": True} if device == "cuda" else {"foreach": True}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, **fused)
    ids = torch.as_tensor(inputs, dtype=torch.long, device=device)
    labels = torch.as_tensor(targets, dtype=torch.long, device=device)

    def forward():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            logits = model(input_ids=ids).logits
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())

    def step():
        loss = forward()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    loss = step()  # warm-up: allocations, kernel selection
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    sync()
    step_s = (time.perf_counter() - start) / steps

    phases = {"forward_s": [], "backward_s": [], "optimizer_s": []}
    for _ in range(steps):
        marks = [time.perf_counter()]
        loss = forward()
        sync()
        marks.append(time.perf_counter())
        loss.backward()
        sync()
        marks.append(time.perf_counter())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        marks.append(time.perf_counter())
        for name, begin, end in zip(phases, marks, marks[1:]):
            phases[name].append(end - begin)
    figures = {
        "impl": f"transformers {transformers.__version__} + torch {torch.__version__} (SDPA)",
        "step_time_s": round(step_s, 4),
        "tokens_per_s": round(ids.numel() / step_s),
        **{name: round(statistics.median(times), 4) for name, times in phases.items()},
        "final_loss": round(float(loss), 4),
    }
    if device == "cuda":
        figures["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return figures
