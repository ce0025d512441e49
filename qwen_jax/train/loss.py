"""Next-token cross-entropy computed in chunks of tokens, so [batch, length, vocab] never exists.

The logits of one chunk are computed, reduced and dropped inside a `lax.scan`. For the training
loss, the same pass also produces the chunk's gradients (`_fused_loss`, a custom VJP), so the
logits are computed once per step and never kept; `token_logprobs` instead rematerializes its
scanned body, recomputing one chunk's logits at a time in the backward pass. Chunks are strided
(chunk j holds tokens j, j+n, j+2n, ... for n chunks) rather than contiguous: when the length
axis is sharded over `sequence`, every chunk still spans all sequence shards, so no device idles
while another computes its block.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from qwen_jax.parallel.logical import constrain

_LOGITS = ("activation_batch", "activation_length", "activation_vocab")
_HIDDEN = ("activation_batch", "activation_length", "activation_embed")
_KERNEL = ("embed", "vocab")


def _num_chunks(length: int, chunk_size: int) -> int:
    if chunk_size <= 0:
        raise ValueError(f"chunk_size={chunk_size} must be positive")
    chunk_size = min(chunk_size, length)
    if length % chunk_size:
        raise ValueError(
            f"sequence length {length} is not a multiple of the loss chunk_size {chunk_size}"
        )
    return length // chunk_size


def _strided(x: jax.Array, num_chunks: int) -> jax.Array:
    """[B, T, ...] -> [n, B, T/n, ...] with chunk j = tokens j, j+n, ..."""
    b, t = x.shape[:2]
    x = x.reshape(b, t // num_chunks, num_chunks, *x.shape[2:])
    return jnp.moveaxis(x, 2, 0)


def _unstrided(x: jax.Array) -> jax.Array:
    """Inverse of `_strided`: [n, B, T/n, ...] -> [B, T, ...]."""
    n, b, c = x.shape[:3]
    return jnp.moveaxis(x, 0, 2).reshape(b, c * n, *x.shape[3:])


def _chunk_logits(hidden, output_kernel):
    logits = jnp.einsum(
        "btd,dv->btv",
        hidden,
        output_kernel.astype(hidden.dtype),
        preferred_element_type=jnp.float32,
    )
    return constrain(logits, _LOGITS)


def _fused_chunks(hidden, output_kernel, targets, mask, num_chunks, z_loss, with_gradients):
    """Summed loss, -log p(target) and logsumexp² over tokens with `mask` > 0, one chunk's logits
    at a time; `with_gradients`: also the loss's gradients in hidden and output_kernel."""
    vocab = output_kernel.shape[1]

    def body(carry, chunk):
        h, t, m = chunk
        t = t.astype(jnp.int32)
        logits = _chunk_logits(h, output_kernel)
        lse = jax.nn.logsumexp(logits, axis=-1)
        target = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
        nll = jnp.sum((lse - target) * m)
        z = jnp.sum(lse * lse * m)
        sums = (carry[0] + nll + z_loss * z, carry[1] + nll, carry[2] + z)
        if not with_gradients:
            return sums, None
        # d/dlogits of m * (lse - logits[t] + z_loss * lse²).
        probs = jnp.exp(logits - lse[..., None])
        one_hot = jnp.arange(vocab, dtype=jnp.int32) == t[..., None]
        d_logits = m[..., None] * (probs * (1.0 + 2.0 * z_loss * lse[..., None]) - one_hot)
        d_logits = constrain(d_logits, _LOGITS).astype(h.dtype)
        kernel = output_kernel.astype(h.dtype)
        d_h = jnp.einsum("btv,dv->btd", d_logits, kernel, preferred_element_type=jnp.float32)
        d_kernel = carry[3] + jnp.einsum(
            "btd,btv->dv", h, d_logits, preferred_element_type=jnp.float32
        )
        # Sharded as the kernel is: left to propagation, the carry can end up replicated.
        d_kernel = constrain(d_kernel, _KERNEL)
        return (*sums, d_kernel), constrain(d_h.astype(h.dtype), _HIDDEN)

    zero = jnp.zeros((), jnp.float32)
    init = (zero, zero, zero)
    if with_gradients:
        init = (*init, constrain(jnp.zeros(output_kernel.shape, jnp.float32), _KERNEL))
    chunks = (
        _strided(hidden, num_chunks),
        _strided(targets, num_chunks),
        _strided(mask, num_chunks),
    )
    return jax.lax.scan(body, init, chunks)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _fused_loss(hidden, output_kernel, targets, mask, num_chunks, z_loss):
    """(loss_sum, (nll_sum, z_sum)), differentiable in hidden and output_kernel through the loss
    only: the statistics' cotangents are dropped, so callers stop their gradients."""
    (loss, nll, z), _ = _fused_chunks(
        hidden, output_kernel, targets, mask, num_chunks, z_loss, with_gradients=False
    )
    return loss, (nll, z)


def _fused_loss_fwd(hidden, output_kernel, targets, mask, num_chunks, z_loss):
    # The gradients for a cotangent of one come out of the same pass over each chunk's logits,
    # so the logits are computed once per step rather than again in the backward pass.
    (loss, nll, z, d_kernel), d_hidden = _fused_chunks(
        hidden, output_kernel, targets, mask, num_chunks, z_loss, with_gradients=True
    )
    residuals = (_unstrided(d_hidden), d_kernel.astype(output_kernel.dtype), targets, mask)
    return (loss, (nll, z)), residuals


def _fused_loss_bwd(num_chunks, z_loss, residuals, cotangents):
    del num_chunks, z_loss
    d_hidden, d_kernel, targets, mask = residuals
    scale = cotangents[0]
    return (
        (scale * d_hidden).astype(d_hidden.dtype),
        (scale * d_kernel).astype(d_kernel.dtype),
        np.zeros(targets.shape, jax.dtypes.float0),
        jnp.zeros_like(mask),
    )


_fused_loss.defvjp(_fused_loss_fwd, _fused_loss_bwd)


def chunked_cross_entropy(
    hidden: jax.Array,
    output_kernel: jax.Array,
    targets: jax.Array,
    loss_mask: jax.Array,
    *,
    chunk_size: int,
    z_loss: float = 0.0,
) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """Summed (not averaged) loss over tokens with `loss_mask` > 0, and the summed mask weight.

    hidden [B, T, E] (compute dtype), output_kernel [E, V], targets and loss_mask [B, T].
    The loss per token is -log p(target) + z_loss * logsumexp² (PaLM's z-loss). The caller divides
    by the weight: summing lets gradient accumulation and data parallelism normalize by the
    total weight of the global batch.
    """
    n = _num_chunks(hidden.shape[1], chunk_size)
    mask = loss_mask.astype(jnp.float32)
    loss_sum, stats = _fused_loss(hidden, output_kernel, targets, mask, n, z_loss)
    nll_sum, z_sum = jax.lax.stop_gradient(stats)
    return loss_sum, jnp.sum(mask), {"nll_sum": nll_sum, "z_loss_sum": z_sum}


def token_logprobs(
    hidden: jax.Array,
    output_kernel: jax.Array,
    targets: jax.Array,
    *,
    chunk_size: int,
    temperature: float = 1.0,
    with_entropy: bool = False,
):
    """log p(targets) per token [B, T] in float32, computed chunk by chunk (for DPO, GRPO and
    eval), under the logits divided by `temperature` (GRPO scores samples under the distribution
    they were drawn from). `with_entropy`: (log-probs, entropy of each token's distribution)."""
    n = _num_chunks(hidden.shape[1], chunk_size)

    @jax.checkpoint
    def body(_, chunk):
        h, t = chunk
        logits = _chunk_logits(h, output_kernel)
        if temperature != 1.0:
            logits = logits / temperature
        lse = jax.nn.logsumexp(logits, axis=-1)
        target = jnp.take_along_axis(logits, t[..., None].astype(jnp.int32), axis=-1)[..., 0]
        if not with_entropy:
            return None, target - lse
        entropy = lse - jnp.sum(jax.nn.softmax(logits, axis=-1) * logits, axis=-1)
        return None, (target - lse, entropy)

    _, out = jax.lax.scan(body, None, (_strided(hidden, n), _strided(targets, n)))
    return jax.tree.map(_unstrided, out)
