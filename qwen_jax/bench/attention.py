"""Attention throughput on the local device: forward and forward+backward TFLOP/s of each attention
implementation, beside PyTorch's `scaled_dot_product_attention` when torch is installed.

  python -m qwen_jax.bench.attention --seq_lens=2048,4096,8192,16384

Shapes: bfloat16, head_dim 128, query/KV heads 28/4 (GQA 7:1, Qwen2.5-7B) and 64/8 (8:1,
72B), a fixed number of tokens per batch (`--tokens`, so rows = tokens / length), each row either
causal or packed with `--documents` equal documents. FLOPs count the forward as
4 * length^2 * heads * head_dim per row, halved for causal, and the backward as 2.5 times the
forward; packed rows are credited the causal row's FLOPs, so their figure above the causal one is
the work the kernel skips. Implementations run through the model's registry (`pallas` is the
Triton kernel on GPUs, Mosaic on TPUs); what cannot run (out of memory, another platform) prints
its one-line reason. PyTorch runs only the causal layout: SDPA has no segment ids.

Prints one JSON line per measurement, then a markdown table.
"""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from qwen_jax import cli
from qwen_jax.bench.timing import median_seconds
from qwen_jax.kernels import registry

_SEQ_LENS = flags.DEFINE_list("seq_lens", ["2048", "4096", "8192", "16384"], "tokens per row")
_TOKENS = flags.DEFINE_integer("tokens", 16384, "tokens per batch (rows = tokens / length)")
_HEADS = flags.DEFINE_list("heads", ["28:4", "64:8"], "query heads:KV heads")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 128, "head dimension")
_DOCUMENTS = flags.DEFINE_integer("documents", 8, "equal documents per packed row")
_IMPLS = flags.DEFINE_list("impls", [], "implementations (default: those this platform runs)")
_BLOCKS = flags.DEFINE_list("flash_block_sizes", [], "Runtime.flash_block_sizes for the kernels")
_REPS = flags.DEFINE_integer("reps", 10, "timed repetitions (median) after a warm-up")
_TORCH = flags.DEFINE_bool("torch", True, "also time PyTorch SDPA when torch is installed")

PLATFORM_IMPLS = {"gpu": ["pallas", "cudnn", "xla"], "tpu": ["pallas", "splash", "xla"]}


def layout(rows: int, length: int, documents: int):
    """(segment ids, positions) [rows, length]: causal rows (documents == 1) or equal documents."""
    doc_len = length // documents
    index = np.arange(length)
    segments = np.minimum(index // doc_len, documents - 1) + 1
    positions = index - (segments - 1) * doc_len
    return (
        jnp.asarray(np.broadcast_to(segments, (rows, length)), jnp.int32),
        jnp.asarray(np.broadcast_to(positions, (rows, length)), jnp.int32),
    )


def causal_flops(rows: int, length: int, heads: int, head_dim: int) -> float:
    return 4.0 * rows * length * length * heads * head_dim / 2


def time_jax(name, q, k, v, segments, positions, reps, blocks):
    fn = registry.attention_fn(name, mesh=None, rules=None, block_size=0, flash_block_sizes=blocks)
    tokens = dict(
        q_segment_ids=segments,
        kv_segment_ids=segments,
        q_positions=positions,
        kv_positions=positions,
    )
    forward = jax.jit(lambda q, k, v: fn(q, k, v, **tokens))

    def loss(q, k, v):
        return jnp.sum(fn(q, k, v, **tokens).astype(jnp.float32) ** 2)

    both = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    return (
        median_seconds(lambda: forward(q, k, v), reps),
        median_seconds(lambda: both(q, k, v), reps),
    )


def time_torch(rows, length, heads, kv_heads, head_dim, reps):
    import torch
    import torch.nn.functional as F

    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    gen = torch.Generator(device=device).manual_seed(0)

    def normal(h):
        return torch.randn(rows, h, length, head_dim, device=device, generator=gen).to(
            torch.bfloat16
        )

    q, k, v = normal(heads).requires_grad_(), normal(kv_heads), normal(kv_heads)
    k.requires_grad_()
    v.requires_grad_()

    def forward():
        with torch.no_grad():
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    def both():
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        out.float().pow(2).sum().backward()
        q.grad = k.grad = v.grad = None

    def run(fn):
        return median_seconds(fn, reps, sync=lambda _: sync())

    return run(forward), run(both)


def _measure(impl, shape, layout_name, timer):
    rows, length, heads, kv_heads, head_dim = shape
    flops = causal_flops(rows, length, heads, head_dim)
    figure = dict(
        impl=impl,
        layout=layout_name,
        seq_len=length,
        rows=rows,
        heads=f"{heads}:{kv_heads}",
        device=jax.devices()[0].device_kind,
    )
    try:
        forward_s, both_s = timer()
    except Exception as error:  # out of memory, or a platform the implementation lacks
        figure["error"] = str(error).strip().splitlines()[0][:160]
        return figure
    figure.update(
        forward_ms=round(forward_s * 1e3, 3),
        forward_backward_ms=round(both_s * 1e3, 3),
        forward_tflops=round(flops / forward_s / 1e12, 1),
        forward_backward_tflops=round(3.5 * flops / both_s / 1e12, 1),
    )
    return figure


def main() -> None:
    platform = jax.default_backend()
    impls = _IMPLS.value or PLATFORM_IMPLS.get(platform, ["xla"])
    blocks = tuple(int(b) for b in _BLOCKS.value)
    torch_available = _TORCH.value and _torch_installed()
    figures = []
    for length in (int(n) for n in _SEQ_LENS.value):
        rows = max(1, _TOKENS.value // length)
        for pair in _HEADS.value:
            heads, kv_heads = (int(n) for n in pair.split(":"))
            shape = (rows, length, heads, kv_heads, _HEAD_DIM.value)
            keys = jax.random.split(jax.random.key(0), 3)
            q = jax.random.normal(keys[0], (rows, length, heads, _HEAD_DIM.value), jnp.bfloat16)
            k, v = (
                jax.random.normal(key, (rows, length, kv_heads, _HEAD_DIM.value), jnp.bfloat16)
                for key in keys[1:]
            )
            for layout_name, documents in (("causal", 1), ("packed", _DOCUMENTS.value)):
                segments, positions = layout(rows, length, documents)
                for impl in impls:
                    figures.append(
                        _measure(
                            impl,
                            shape,
                            layout_name,
                            lambda impl=impl: time_jax(
                                impl, q, k, v, segments, positions, _REPS.value, blocks
                            ),
                        )
                    )
                    print(json.dumps(figures[-1]), flush=True)
            if torch_available:
                figures.append(
                    _measure(
                        "torch_sdpa",
                        shape,
                        "causal",
                        lambda: time_torch(*shape[:4], _HEAD_DIM.value, _REPS.value),
                    )
                )
                print(json.dumps(figures[-1]), flush=True)
    print(table(figures))


def _torch_installed() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def table(figures) -> str:
    lines = [
        "| seq_len | heads | layout | impl | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for f in figures:
        if "error" in f:
            cells = ["-", f"({f['error']})", "-", "-"]
        else:
            cells = [
                f["forward_ms"],
                f["forward_tflops"],
                f["forward_backward_ms"],
                f["forward_backward_tflops"],
            ]
        lines.append(
            f"| {f['seq_len']} | {f['heads']} | {f['layout']} | {f['impl']} | "
            + " | ".join(str(c) for c in cells)
            + " |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(cli.run(main, argv)))
