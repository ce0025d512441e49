"""Attention run per shard under `shard_map`: over a sharded sequence axis, and for kernels.

Two uses share one wrapper:
- `sequence_sharded` (registered in the attention registry): each device holds a block of the
  queries of its examples; keys, values and their segment ids and positions are all-gathered along
  the `sequence` mesh axis, and the usual mask rule (same segment, key position <= query position)
  makes the result equal to unsharded attention, packed documents included. Memory per device is
  O(T/s · T) for scores instead of O(T²), and the gathered K/V is only [b, T, kv_heads, d].
- `shard_mapped(fn)`: a hook for kernels that XLA cannot partition (Pallas/Mosaic): the kernel
  sees only its local batch, heads and (gathered) keys.
The mesh and rules come from `logical.active()`; outside an active mesh the function runs as is.
"""

from __future__ import annotations

import functools

import gin
import jax
import jax.numpy as jnp

from qwen_jax.model import attention as attention_lib
from qwen_jax.parallel import logical

_Q = ("activation_batch", "activation_length", "activation_heads", None)
_KV = ("activation_batch", "activation_length", "activation_kv_heads", None)
_TOKENS = ("activation_batch", "activation_length")
SEQUENCE_AXIS = "sequence"


def shard_mapped(fn: attention_lib.AttentionFn) -> attention_lib.AttentionFn:
    """Wraps a per-shard attention function so that it runs under shard_map on the active mesh,
    with keys/values gathered along the sequence axis when it has more than one device."""

    @functools.wraps(fn)
    def wrapped(q, k, v, *, q_segment_ids, kv_segment_ids, q_positions, kv_positions):
        context = logical.active()
        if context is None:
            return fn(
                q,
                k,
                v,
                q_segment_ids=q_segment_ids,
                kv_segment_ids=kv_segment_ids,
                q_positions=q_positions,
                kv_positions=kv_positions,
            )
        mesh, rules = context
        q_spec = logical.logical_to_spec(_Q, rules)
        kv_spec = logical.logical_to_spec(_KV, rules)
        token_spec = logical.logical_to_spec(_TOKENS, rules)
        seq_axis = token_spec[1] if len(token_spec) > 1 else None
        seq_axes = (seq_axis,) if isinstance(seq_axis, str) else tuple(seq_axis or ())

        def per_shard(q, k, v, q_seg, kv_seg, q_pos, kv_pos):
            if seq_axes and any(mesh.shape[a] > 1 for a in seq_axes):
                gather = functools.partial(
                    jax.lax.all_gather, axis_name=seq_axes, axis=1, tiled=True
                )
                k, v, kv_seg, kv_pos = gather(k), gather(v), gather(kv_seg), gather(kv_pos)
            return fn(
                q,
                k,
                v,
                q_segment_ids=q_seg,
                kv_segment_ids=kv_seg,
                q_positions=q_pos,
                kv_positions=kv_pos,
            )

        return jax.shard_map(
            per_shard,
            mesh=mesh,
            in_specs=(q_spec, kv_spec, kv_spec, token_spec, token_spec, token_spec, token_spec),
            out_specs=q_spec,
            check_vma=False,
        )(q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions)

    return wrapped


@gin.configurable
def query_block_size(size: int = 2048) -> int:
    """Queries per block in `sequence_sharded` attention (0: one block)."""
    return size


def query_blocked(fn: attention_lib.AttentionFn) -> attention_lib.AttentionFn:
    """Runs `fn` over blocks of queries against all keys, one block at a time with its scores
    rematerialized, so per-device scores are [b, heads, block, T] rather than [b, heads, T/s, T]
    (72B at 32K tokens: 1 GiB per block instead of 64 GiB)."""

    @functools.wraps(fn)
    def blocked(q, k, v, *, q_segment_ids, kv_segment_ids, q_positions, kv_positions):
        block = query_block_size()
        length = q.shape[1]
        if not block or length <= block or length % block:
            return fn(
                q,
                k,
                v,
                q_segment_ids=q_segment_ids,
                kv_segment_ids=kv_segment_ids,
                q_positions=q_positions,
                kv_positions=kv_positions,
            )
        n = length // block

        def split(x):
            return jnp.moveaxis(x.reshape(x.shape[0], n, block, *x.shape[2:]), 1, 0)

        @jax.checkpoint
        def one(blocks):
            q_block, segments, positions = blocks
            return fn(
                q_block,
                k,
                v,
                q_segment_ids=segments,
                kv_segment_ids=kv_segment_ids,
                q_positions=positions,
                kv_positions=kv_positions,
            )

        out = jax.lax.map(one, (split(q), split(q_segment_ids), split(q_positions)))
        return jnp.moveaxis(out, 0, 1).reshape(q.shape)

    return blocked


attention_lib.register("sequence_sharded")(shard_mapped(query_blocked(attention_lib.xla_attention)))
