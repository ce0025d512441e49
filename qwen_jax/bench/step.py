"""Train-step throughput on the local devices: tokens/s, step time and MFU.

    python -m qwen_jax.bench.step --gin_file=configs/models/qwen2_5_0_5b.gin \
        --seq_len=4096 --batch=8 --steps=10

With `--grpo_new_tokens=N`, a GRPO step instead: `--batch` rows (`--grpo_generations` per
prompt) of `seq_len - N` prompt tokens each sample N new tokens with the KV-cache decoder from
the current parameters (no stop token, so every row generates all N), then the GRPO update on
those rows; it prints generated tokens/s and the share of the step spent generating.

With `--peer=torch`, the same step in transformers + PyTorch beside ours (`bench/torch_peer.py`):
`--repeats` rounds, each running our step and then the peer's, each side in a fresh process so
that neither holds device memory while the other runs (a compilation cache keeps our repeats from
recompiling). Rows are causal (one document each), since SDPA has no segment ids. Prints each
round's figures, then one JSON line with the medians, the tokens/s ratio and each side's forward,
backward and optimizer times.

Runs the real sharded train step (forward, backward, AdamW update) on synthetic packed batches,
with bf16 compute over fp32 master weights and the mesh from `configs/mesh/rules.gin` (FSDP over
all local devices unless `--gin_param` says otherwise). Prints one JSON line: step time, tokens/s,
MFU, peak device memory, and the forward, backward and optimizer times (forward-only and
forward+backward programs timed on their own; the optimizer is the rest of the step). With
`--profile_steps=N`, then N more steps under the JAX profiler, summed per XLA op (`profile.py`).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
from absl import app, flags
from flax import nnx

from qwen_jax import cli
from qwen_jax.bench import profile, torch_peer
from qwen_jax.bench.timing import median_seconds
from qwen_jax.model.config import QwenConfig, model_flops_per_token
from qwen_jax.model.layers import Runtime
from qwen_jax.model.transformer import Qwen2ForCausalLM
from qwen_jax.model.generate import Sampling, generate
from qwen_jax.parallel import logical
from qwen_jax.parallel import mesh as mesh_lib
from qwen_jax.train import grpo
from qwen_jax.train import metrics as metrics_lib
from qwen_jax.train import optimizer as optimizer_lib
from qwen_jax.train.state import create_train_state
from qwen_jax.train.grpo_task import completion_rows
from qwen_jax.train.step import lm_loss_fn, make_train_step


def synthetic_batch(config: QwenConfig, batch: int, seq_len: int, documents_per_row: int = 4):
    """Random tokens in rows of equal-length packed documents (segment ids and positions set)."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, config.vocab_size, (batch, seq_len + 1), dtype=np.int32)
    doc_len = seq_len // documents_per_row
    index = np.arange(seq_len)
    segment_ids = np.broadcast_to(
        np.minimum(index // doc_len, documents_per_row - 1) + 1, (batch, seq_len)
    ).astype(np.int32)
    positions = np.broadcast_to(index - (segment_ids[0] - 1) * doc_len, (batch, seq_len))
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "loss_mask": np.ones((batch, seq_len), np.float32),
        "segment_ids": segment_ids,
        "positions": positions.astype(np.int32),
    }


def _phases(graphdef, params, batch, mesh, rules, steps: int, step_time: float) -> dict:
    """Forward and backward times from forward-only and forward+backward programs; the optimizer
    (and the step's clipping and NaN guard) is what the whole step adds."""

    def loss(params, batch):
        with logical.activate(mesh, rules):
            loss_sum, aux = lm_loss_fn(nnx.merge(graphdef, params), batch)
        return loss_sum / aux["weight"]

    forward, both = jax.jit(loss), jax.jit(jax.grad(loss))
    forward_s = median_seconds(lambda: forward(params, batch), steps)
    both_s = median_seconds(lambda: both(params, batch), steps)
    return {
        "forward_s": round(forward_s, 4),
        "backward_s": round(both_s - forward_s, 4),
        "optimizer_s": round(step_time - both_s, 4),
    }


def run(
    config: QwenConfig,
    runtime: Runtime,
    mesh,
    rules,
    *,
    seq_len: int,
    batch: int,
    steps: int,
    documents_per_row: int = 4,
    profile_calls: int = 0,
):
    optimizer, _ = optimizer_lib.make_optimizer(schedule=optimizer_lib.constant(1e-4))
    state, graphdef, shardings = create_train_state(
        lambda: Qwen2ForCausalLM(config, runtime, rngs=nnx.Rngs(0)), optimizer, mesh, rules
    )
    host_batch = synthetic_batch(config, batch, seq_len, documents_per_row)
    batch_shardings = mesh_lib.batch_shardings(mesh, rules, host_batch)
    device_batch = jax.device_put(host_batch, batch_shardings)
    train_step = make_train_step(
        graphdef,
        lm_loss_fn,
        optimizer,
        mesh=mesh,
        rules=rules,
        state_shardings=shardings,
        batch_shardings=batch_shardings,
    )
    start = time.perf_counter()
    state, metrics = train_step(state, device_batch)
    jax.block_until_ready(metrics)
    compile_and_first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = train_step(state, device_batch)
    loss = float(jax.block_until_ready(metrics)["loss"])
    step_time = (time.perf_counter() - start) / steps
    tokens_per_second = batch * seq_len / step_time
    mfu = metrics_lib.mfu(model_flops_per_token(config, seq_len), tokens_per_second)
    memory = jax.devices()[0].memory_stats() or {}
    phases = _phases(graphdef, state.params, device_batch, mesh, rules, steps, step_time)
    if profile_calls:

        def step_once():
            nonlocal state
            state, metrics = train_step(state, device_batch)
            jax.block_until_ready(metrics)

        phases["profile"] = profile.op_summary(step_once, profile_calls)
    return {
        "device": jax.devices()[0].device_kind,
        "num_devices": jax.device_count(),
        "mesh": dict(mesh.shape),
        "params": sum(x.size for x in jax.tree.leaves(state.params)),
        "seq_len": seq_len,
        "batch": batch,
        "dtype": runtime.dtype,
        "remat_policy": runtime.remat_policy,
        "attention_impl": runtime.attention_impl,
        "first_step_s": round(compile_and_first, 2),
        "step_time_s": round(step_time, 4),
        "tokens_per_s": round(tokens_per_second),
        "mfu": None if mfu is None else round(mfu, 4),
        "peak_memory_gib": (
            round(memory["peak_bytes_in_use"] / 2**30, 2) if "peak_bytes_in_use" in memory else None
        ),
        **phases,
        "final_loss": round(loss, 4),
    }


def run_beside_peer(argv: list[str], repeats: int) -> dict:
    """Rounds of our step then the peer's, each in a fresh process; medians and the ratio."""
    rounds = {"qwen_jax": [], "peer": []}
    with tempfile.TemporaryDirectory() as cache:
        for _ in range(repeats):
            for side, key in (("qwen_jax", "qwen_jax"), ("torch", "peer")):
                result = subprocess.run(
                    [sys.executable, "-m", "qwen_jax.bench.step", *argv, f"--side={side}"],
                    env={**os.environ, "JAX_COMPILATION_CACHE_DIR": cache},
                    capture_output=True,
                    text=True,
                )
                if result.returncode:
                    raise RuntimeError(f"the {side} side failed: {result.stderr[-2000:]}")
                figures = json.loads(result.stdout.strip().splitlines()[-1])
                print(json.dumps({"side": side, **figures}), flush=True)
                rounds[key].append(figures)

    def medians(figures):
        names = ("step_time_s", "tokens_per_s", "forward_s", "backward_s", "optimizer_s")
        return {n: statistics.median(f[n] for f in figures) for n in names}

    ours, peer = medians(rounds["qwen_jax"]), medians(rounds["peer"])
    return {
        "repeats": repeats,
        "qwen_jax": {**ours, "mfu": statistics.median(f["mfu"] or 0 for f in rounds["qwen_jax"])},
        "peer": {"impl": rounds["peer"][0]["impl"], **peer},
        "tokens_per_s_ratio": round(ours["tokens_per_s"] / peer["tokens_per_s"], 3),
    }


def run_grpo(
    config: QwenConfig,
    runtime: Runtime,
    mesh,
    rules,
    *,
    seq_len: int,
    batch: int,
    new_tokens: int,
    generations: int,
    steps: int,
):
    """Rollout (sampling) and update times of GRPO steps on random prompts."""
    if not 0 < new_tokens < seq_len or batch % generations:
        raise ValueError("--grpo_new_tokens must be in (0, seq_len); --batch a multiple of G")
    optimizer, _ = optimizer_lib.make_optimizer(schedule=optimizer_lib.constant(1e-6))
    state, graphdef, shardings = create_train_state(
        lambda: Qwen2ForCausalLM(config, runtime, rngs=nnx.Rngs(0)), optimizer, mesh, rules
    )
    rng = np.random.default_rng(0)
    prompt_len = seq_len - new_tokens
    prompts = np.repeat(
        rng.integers(0, config.vocab_size, (batch // generations, prompt_len), dtype=np.int32),
        generations,
        axis=0,
    )
    prompt_mask = np.ones_like(prompts)
    loss_fn = grpo.make_grpo_loss_fn(
        grpo.GRPOConfig(num_generations=generations),
        max_completion_length=new_tokens,
        temperature=1.0,
        chunk_size=min(seq_len, 1024),
    )
    shapes = {k: jax.ShapeDtypeStruct((batch, seq_len), np.int32) for k in ("inputs", "targets")}
    shapes.update(
        positions=shapes["inputs"],
        segment_ids=shapes["inputs"],
        completion_mask=jax.ShapeDtypeStruct((batch, seq_len), np.float32),
        advantages=jax.ShapeDtypeStruct((batch,), np.float32),
    )
    batch_shardings = mesh_lib.batch_shardings(mesh, rules, shapes)
    train_step = make_train_step(
        graphdef,
        loss_fn,
        optimizer,
        mesh=mesh,
        rules=rules,
        state_shardings=shardings,
        batch_shardings=batch_shardings,
    )
    never = config.vocab_size  # an id no sampler draws: every row generates all its tokens
    timings = []
    for step in range(steps + 1):  # the first compiles
        start = time.perf_counter()
        tokens, lengths = generate(
            nnx.merge(graphdef, state.params),
            prompts,
            prompt_mask,
            max_new_tokens=new_tokens,
            stop_tokens=(never,),
            sampling=Sampling(temperature=1.0),
            rng=jax.random.key(step),
        )
        tokens, lengths = np.asarray(tokens), np.asarray(lengths)
        generated = time.perf_counter()
        rows = completion_rows(prompts, prompt_mask, tokens, lengths, pad_id=0)
        rows["advantages"] = rng.normal(size=batch).astype(np.float32)
        state, metrics = train_step(state, jax.device_put(rows, batch_shardings))
        jax.block_until_ready(metrics)
        timings.append((generated - start, time.perf_counter() - generated))
    generate_s, update_s = np.mean(timings[1:], axis=0)
    return {
        "device": jax.devices()[0].device_kind,
        "num_devices": jax.device_count(),
        "params": sum(x.size for x in jax.tree.leaves(state.params)),
        "dtype": runtime.dtype,
        "rows": batch,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "generate_s": round(float(generate_s), 4),
        "update_s": round(float(update_s), 4),
        "generated_tokens_per_s": round(batch * new_tokens / float(generate_s)),
        "generate_share": round(float(generate_s / (generate_s + update_s)), 3),
    }


def main() -> None:
    from qwen_jax import configurables

    # A training run's defaults: bf16 compute over fp32 master weights, the shipped rules.
    cli.parse_gin(
        cli.GIN_FILE.value,
        cli.GIN_PARAM.value,
        defaults=["include 'configs/mesh/rules.gin'", "layers.Runtime.dtype = 'bfloat16'"],
    )
    if FLAGS.peer and not FLAGS.side:
        argv = [a for a in sys.argv[1:] if not a.startswith(("--peer", "--repeats"))]
        print(json.dumps(run_beside_peer(argv, FLAGS.repeats)))
        return
    mesh, rules = configurables.mesh_and_rules()
    common = dict(seq_len=FLAGS.seq_len, batch=FLAGS.batch, steps=FLAGS.steps)
    config, runtime = configurables.QwenConfig(), configurables.Runtime()
    model = (config, runtime, mesh, rules)
    if FLAGS.side == "torch":
        host_batch = synthetic_batch(config, FLAGS.batch, FLAGS.seq_len, documents_per_row=1)
        figures = torch_peer.step_figures(
            config,
            host_batch["inputs"],
            host_batch["targets"],
            steps=FLAGS.steps,
            bf16=runtime.dtype == "bfloat16",
        )
    elif FLAGS.side == "qwen_jax":
        figures = run(*model, **common, documents_per_row=1)
    elif FLAGS.grpo_new_tokens:
        figures = run_grpo(
            *model,
            new_tokens=FLAGS.grpo_new_tokens,
            generations=FLAGS.grpo_generations,
            **common,
        )
    else:
        figures = run(*model, **common, profile_calls=FLAGS.profile_steps)
    print(json.dumps(figures))


if __name__ == "__main__":
    flags.DEFINE_integer("seq_len", 4096, "tokens per row")
    flags.DEFINE_integer("batch", 8, "rows per step (global)")
    flags.DEFINE_integer("steps", 10, "timed steps after the compiling one")
    flags.DEFINE_integer("grpo_new_tokens", 0, "time a GRPO step sampling this many tokens")
    flags.DEFINE_integer("grpo_generations", 8, "GRPO completions per prompt")
    flags.DEFINE_enum("peer", "", ["", "torch"], "also time the step in this framework")
    flags.DEFINE_integer("repeats", 3, "rounds of ours then the peer's, with --peer")
    flags.DEFINE_enum("side", "", ["", "qwen_jax", "torch"], "one side of a --peer round")
    flags.DEFINE_integer("profile_steps", 0, "then trace this many steps and sum time per XLA op")
    FLAGS = flags.FLAGS
    app.run(lambda argv: sys.exit(cli.run(main, argv)))
