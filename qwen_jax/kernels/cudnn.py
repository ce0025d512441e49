"""cuDNN's fused flash attention (NVIDIA GPUs), through JAX's cuDNN binding with its packed
layout: the fast baseline the Pallas GPU kernel is measured against, and a fallback.

cuDNN expresses the model's mask rule for rows made of contiguous documents, each starting at
position 0, with padding (segment id 0) anywhere between them: causal attention within each
document. The documents of a row are passed as offsets and lengths (at most `MAX_SEGMENTS`).
Every other layout, checked at run time on the segment ids and positions, goes to the Pallas
GPU kernel, which computes the rule for any layout; decoding (queries shorter than the keys)
goes to the reference.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from qwen_jax.kernels import flash_gpu, xla

# Documents per row cuDNN is given; rows with more go to the Pallas kernel. The offsets table is
# tiny, so the bound only has to cover packed pre-training rows.
MAX_SEGMENTS = 64


def document_table(segment_ids, positions, max_segments: int = MAX_SEGMENTS):
    """(offsets [batch, max_segments + 1], lengths [batch, max_segments], expressible [])
    for cuDNN's packed layout: each row's document starts and lengths, -1 past the last, and
    whether every row is made of contiguous documents numbered upwards, each starting at
    position 0, with at most `max_segments` of them."""
    batch, length = segment_ids.shape
    index = jnp.arange(length, dtype=jnp.int32)
    real = segment_ids != 0
    previous = jnp.pad(segment_ids, ((0, 0), (1, 0)), constant_values=-1)[:, :-1]
    starts = real & (segment_ids != previous)
    # A document id seen before (not contiguous) is not a new document to cuDNN.
    seen_max = jax.lax.cummax(jnp.where(real, segment_ids, 0), axis=1)
    seen_before = jnp.pad(seen_max, ((0, 0), (1, 0)))[:, :-1]
    start_at = jax.lax.cummax(jnp.where(starts, index, 0), axis=1)
    expressible = (
        jnp.all(~starts | (segment_ids > seen_before))
        & jnp.all(~real | (positions == index - start_at))
        & jnp.all(starts.sum(1) <= max_segments)
    )
    run = jnp.cumsum(starts, axis=1) - 1  # document number of each real token
    counts = starts.sum(1)
    lengths = jax.vmap(lambda r, m: jnp.zeros(max_segments, jnp.int32).at[r].add(m, mode="drop"))(
        jnp.where(real, run, max_segments), real.astype(jnp.int32)
    )
    slot = jnp.arange(max_segments)
    lengths = jnp.where(slot < counts[:, None], lengths, -1)
    offsets = jax.vmap(lambda s: jnp.nonzero(s, size=max_segments + 1, fill_value=-1)[0])(starts)
    return offsets.astype(jnp.int32), lengths, expressible


def _cudnn_packed(q, k, v, offsets, lengths):
    # The packed-layout entry point is not in jax.nn's public signature; it is JAX's own binding.
    from jax._src.cudnn.fused_attention_stablehlo import MaskType, dot_product_attention

    return dot_product_attention(
        q,
        k,
        v,
        q_seqlen=lengths,
        kv_seqlen=lengths,
        q_offsets=offsets,
        kv_offsets=offsets,
        scale=q.shape[-1] ** -0.5,
        mask_type=MaskType.PADDING_CAUSAL,
        qkv_layout="BTNH",
    )


def cudnn_attention(
    q, k, v, *, q_segment_ids, kv_segment_ids, q_positions, kv_positions, fallback_blocks
):
    tokens = dict(
        q_segment_ids=q_segment_ids,
        kv_segment_ids=kv_segment_ids,
        q_positions=q_positions,
        kv_positions=kv_positions,
    )
    if q.shape[1] != k.shape[1]:
        return xla.xla_attention(q, k, v, **tokens)
    offsets, lengths, expressible = document_table(q_segment_ids, q_positions)
    same_tokens = jnp.all(q_segment_ids == kv_segment_ids) & jnp.all(q_positions == kv_positions)
    fallback = functools.partial(
        flash_gpu.flash_attention, **tokens, blocks=fallback_blocks, interpret=False
    )
    # cuDNN leaves what it computes for padding tokens (outputs forward, dq, dk, dv backward)
    # undefined, possibly NaN. Selecting zeros there on the way in and out keeps it out of both
    # passes: the rule gives padding queries zeros, as the kernels do.
    q_real = (q_segment_ids != 0)[:, :, None, None]
    kv_real = (kv_segment_ids != 0)[:, :, None, None]
    q, k, v = jnp.where(q_real, q, 0), jnp.where(kv_real, k, 0), jnp.where(kv_real, v, 0)
    out = jax.lax.cond(
        expressible & same_tokens,
        lambda q, k, v: _cudnn_packed(q, k, v, offsets, lengths),
        fallback,
        q,
        k,
        v,
    )
    return jnp.where(q_real, out, 0).astype(q.dtype)
