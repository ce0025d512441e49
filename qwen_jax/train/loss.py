"""Next-token cross-entropy computed in chunks of tokens, so [batch, length, vocab] never exists.

The logits of one chunk are computed, reduced and dropped inside a `lax.scan`; the scanned body is
rematerialized, so the backward pass recomputes one chunk's logits at a time instead of keeping
them all. Chunks are strided (chunk j holds tokens j, j+n, j+2n, ... for n chunks) rather than
contiguous: when the length axis is sharded over `sequence`, every chunk still spans all
sequence shards, so no device idles while another computes its block.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qwen_jax.parallel.logical import constrain

_LOGITS = ("activation_batch", "activation_length", "activation_vocab")


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
    """Inverse of `_strided` for [n, B, T/n] -> [B, T]."""
    n, b, c = x.shape
    return jnp.moveaxis(x, 0, 2).reshape(b, c * n)


def _chunk_logits(hidden, output_kernel):
    logits = jnp.einsum(
        "btd,dv->btv",
        hidden,
        output_kernel.astype(hidden.dtype),
        preferred_element_type=jnp.float32,
    )
    return constrain(logits, _LOGITS)


def _target_terms(hidden, output_kernel, targets):
    """(log-sum-exp, target logit) per token, in float32."""
    logits = _chunk_logits(hidden, output_kernel)
    lse = jax.nn.logsumexp(logits, axis=-1)
    target = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return lse, target


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

    @jax.checkpoint
    def body(carry, chunk):
        h, t, m = chunk
        lse, target = _target_terms(h, output_kernel, t)
        nll = jnp.sum((lse - target) * m)
        z = jnp.sum(jnp.square(lse) * m)
        return (carry[0] + nll, carry[1] + z), None

    zero = jnp.zeros((), jnp.float32)
    (nll_sum, z_sum), _ = jax.lax.scan(
        body, (zero, zero), (_strided(hidden, n), _strided(targets, n), _strided(mask, n))
    )
    loss_sum = nll_sum + z_loss * z_sum
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
