"""The cases every attention kernel is checked on against the XLA reference: row layouts the model
trains on, GQA ratios, head dims and dtypes, and the comparison of outputs and dq, dk, dv."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from qwen_jax.kernels.xla import xla_attention

CASES = [
    # (kv heads, query heads per KV head, head_dim, dtype)
    (2, 1, 64, "float32"),
    (2, 2, 128, "float32"),
    (1, 7, 64, "float32"),
    (1, 7, 128, "float32"),
    (2, 2, 64, "bfloat16"),
    (1, 7, 128, "bfloat16"),
]


def positions_of(segments):
    """Positions restart at 0 in each document (and count padding from 0 too)."""
    positions = np.zeros_like(segments)
    for row, ids in enumerate(segments):
        for start in np.flatnonzero(np.diff(ids, prepend=-1)):
            end = start + np.argmax(np.append(ids[start:] != ids[start], True))
            positions[row, start:end] = np.arange(end - start)
    return positions


def packed(rng, length, documents, one_token=0):
    """`documents` contiguous documents with ids 1..documents, `one_token` of them one token
    long, then padding."""
    sizes = rng.integers(2, max(3, 2 * length // (documents + 1)), documents)
    sizes[rng.choice(documents, one_token, replace=False)] = 1
    ids = np.repeat(np.arange(1, documents + 1), sizes)[:length]
    return np.pad(ids, (0, length - len(ids)))


def layouts(length, seed=0):
    """[5, length] segment ids: causal, packed (one-token documents among them), left padding,
    a fully padded row, right padding."""
    rng = np.random.default_rng(seed)
    causal = np.ones(length, np.int32)
    packed_row = packed(rng, length, 9, one_token=3)
    left = np.where(np.arange(length) >= length // 3, 1, 0)
    padding = np.zeros(length, np.int32)
    right = np.where(np.arange(length) < length - 17, 1, 0)
    segments = np.stack([causal, packed_row, left, padding, right]).astype(np.int32)
    return segments, positions_of(segments)


def tokens_of(segments, positions):
    return dict(
        q_segment_ids=jnp.asarray(segments),
        kv_segment_ids=jnp.asarray(segments),
        q_positions=jnp.asarray(positions),
        kv_positions=jnp.asarray(positions),
    )


def outputs_and_grads(fn, q, k, v, cotangent, tokens):
    out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, **tokens), q, k, v)
    return (out, *vjp(cotangent.astype(out.dtype)))


def max_relative(got, want):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def check_against_reference(fn, kv_heads, groups, head_dim, dtype, *, length=200, rtol=2e-2):
    """`fn`'s outputs and dq, dk, dv on every layout equal the float32 reference on the same
    (rounded) inputs: within 1e-5 absolute in float32, `rtol` of the largest entry otherwise."""
    segments, positions = layouts(length)
    tokens = tokens_of(segments, positions)
    rng = np.random.default_rng(1)
    batch, heads = len(segments), kv_heads * groups

    def normal(*shape):
        return jnp.asarray(rng.normal(size=shape), jnp.float32).astype(dtype)

    q = normal(batch, length, heads, head_dim)
    k, v = normal(batch, length, kv_heads, head_dim), normal(batch, length, kv_heads, head_dim)
    # The reference gives padding queries (fully masked rows) the mean of V; ours gives zeros.
    # Neither reaches a loss, so the cotangent is zero there and outputs are compared on real rows.
    real = (segments != 0)[:, :, None, None]
    cotangent = jnp.asarray(rng.normal(size=q.shape) * real, jnp.float32)

    # float32 products in full precision: a GPU otherwise runs them in TF32, in the kernel (as
    # interpreted) and in the reference.
    precision = "highest" if dtype == "float32" else None
    with jax.default_matmul_precision(precision):
        got = jax.jit(lambda *a: outputs_and_grads(fn, *a, cotangent, tokens))(q, k, v)
        f32 = [x.astype(jnp.float32) for x in (q, k, v)]
        want = outputs_and_grads(xla_attention, *f32, cotangent, tokens)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert g.dtype == q.dtype, name
        assert np.all(np.isfinite(np.asarray(g, np.float32))), name
        if name == "out":
            assert not np.any(np.asarray(g)[~real[..., 0, 0]]), "padding queries must give zeros"
            g, w = np.where(real, g, 0), np.where(real, w, 0)
        if dtype == "float32":
            np.testing.assert_allclose(g, w, atol=1e-5, rtol=0, err_msg=name)
        else:
            assert max_relative(g, w) <= rtol, (name, max_relative(g, w))
