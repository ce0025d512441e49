"""Chunked cross-entropy against the analytic definition on full logits, and its memory."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen_jax.train.loss import chunked_cross_entropy, token_logprobs

B, T, E, V = 2, 32, 16, 64


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    hidden = jnp.asarray(rng.normal(size=(B, T, E)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(E, V)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32)
    mask = jnp.asarray(rng.random((B, T)) < 0.7, jnp.float32)
    return hidden, kernel, targets, mask


def _reference(hidden, kernel, targets, mask, z_loss):
    """-log softmax(target) + z_loss * logsumexp², summed where mask, from full logits in numpy."""
    logits = np.einsum("btd,dv->btv", np.float64(hidden), np.float64(kernel))
    top = logits.max(-1, keepdims=True)
    lse = (top + np.log(np.exp(logits - top).sum(-1, keepdims=True)))[..., 0]
    target = np.take_along_axis(logits, np.asarray(targets)[..., None], -1)[..., 0]
    return np.sum((lse - target + z_loss * lse**2) * mask), lse, target


@pytest.mark.parametrize("chunk_size", [4, 32, 1000])
@pytest.mark.parametrize("z_loss", [0.0, 1e-3])
def test_chunked_cross_entropy_matches_definition(chunk_size, z_loss):
    hidden, kernel, targets, mask = _inputs()
    loss, weight, aux = chunked_cross_entropy(
        hidden, kernel, targets, mask, chunk_size=chunk_size, z_loss=z_loss
    )
    expected, _, _ = _reference(hidden, kernel, targets, mask, z_loss)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    assert float(weight) == float(mask.sum())

    def full(h, k):
        logits = jnp.einsum("btd,dv->btv", h, k)
        lse = jax.nn.logsumexp(logits, -1)
        tgt = jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
        return jnp.sum((lse - tgt + z_loss * lse**2) * mask)

    def chunked(h, k):
        return chunked_cross_entropy(h, k, targets, mask, chunk_size=chunk_size, z_loss=z_loss)[0]

    for got, want in zip(
        jax.grad(chunked, (0, 1))(hidden, kernel), jax.grad(full, (0, 1))(hidden, kernel)
    ):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_token_logprobs_match_log_softmax():
    hidden, kernel, targets, _ = _inputs(1)
    got = token_logprobs(hidden, kernel, targets, chunk_size=8)
    _, lse, target = _reference(hidden, kernel, targets, np.ones((B, T)), 0.0)
    np.testing.assert_allclose(got, target - lse, rtol=1e-5, atol=1e-5)


def test_bad_chunk_size():
    hidden, kernel, targets, mask = _inputs()
    with pytest.raises(ValueError, match="not a multiple of the loss chunk_size 5"):
        chunked_cross_entropy(hidden, kernel, targets, mask, chunk_size=5)


def test_chunking_cuts_peak_memory():
    """Compiled loss+gradient: the chunked version never holds [B, T, V] logits."""
    b, t, e, v, chunk = 2, 1024, 32, 8192, 128
    hidden = jax.ShapeDtypeStruct((b, t, e), jnp.float32)
    kernel = jax.ShapeDtypeStruct((e, v), jnp.float32)
    targets = jax.ShapeDtypeStruct((b, t), jnp.int32)
    mask = jax.ShapeDtypeStruct((b, t), jnp.float32)

    def unchunked(h, k, tg, m):
        return chunked_cross_entropy(h, k, tg, m, chunk_size=t)[0]

    def chunked(h, k, tg, m):
        return chunked_cross_entropy(h, k, tg, m, chunk_size=chunk)[0]

    def temp(fn):
        compiled = jax.jit(jax.grad(fn, (0, 1))).lower(hidden, kernel, targets, mask).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    logits_bytes = b * t * v * 4
    full, small = temp(unchunked), temp(chunked)
    assert full >= logits_bytes  # the unchunked gradient holds at least the logits
    assert small < logits_bytes // 3, (small, full)  # measured: 18.4 MB vs 134 MB
