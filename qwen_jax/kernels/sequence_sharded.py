"""Attention over a sharded sequence axis, one device's block of queries at a time.

Each device holds a block of the queries of its examples; keys, values and their segment ids and
positions are all-gathered along the mesh axes that shard `activation_length`, and the mask rule
(same segment, key position <= query position) makes the result equal to unsharded attention,
packed documents included. Memory per device is O(T/s · T) for scores instead of O(T²), and the
gathered K/V is only [b, T, kv_heads, d]. Queries are further split into blocks of `block_size`
(rematerialized), so per-device scores are [b, heads, block, T].

`shard_mapped` is also the way in for kernels that XLA cannot partition (Pallas/Mosaic): the
kernel sees only its local batch, heads and (gathered) keys.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from qwen_jax.model.attention import AttentionFn
from qwen_jax.parallel import logical

_Q = ("activation_batch", "activation_length", "activation_heads", None)
_KV = ("activation_batch", "activation_length", "activation_kv_heads", None)
_TOKENS = ("activation_batch", "activation_length")


def _call(fn: AttentionFn, q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions):
    return fn(
        q,
        k,
        v,
        q_segment_ids=q_segment_ids,
        kv_segment_ids=kv_segment_ids,
        q_positions=q_positions,
        kv_positions=kv_positions,
    )


def shard_mapped(fn: AttentionFn, mesh: Mesh | None, rules: logical.LogicalRules) -> AttentionFn:
    """`fn` run per shard under shard_map on `mesh`, with keys/values gathered along the sequence
    axes when they have more than one device. Without a mesh, `fn` itself."""
    if mesh is None:
        return fn
    q_spec = logical.logical_to_spec(_Q, rules)
    kv_spec = logical.logical_to_spec(_KV, rules)
    token_spec = logical.logical_to_spec(_TOKENS, rules)
    seq_axis = token_spec[1] if len(token_spec) > 1 else None
    seq_axes = (seq_axis,) if isinstance(seq_axis, str) else tuple(seq_axis or ())
    gathers = any(mesh.shape[a] > 1 for a in seq_axes)

    def per_shard(q, k, v, q_seg, kv_seg, q_pos, kv_pos):
        if gathers:
            gather = functools.partial(jax.lax.all_gather, axis_name=seq_axes, axis=1, tiled=True)
            k, v, kv_seg, kv_pos = gather(k), gather(v), gather(kv_seg), gather(kv_pos)
        return _call(fn, q, k, v, q_seg, kv_seg, q_pos, kv_pos)

    def wrapped(q, k, v, *, q_segment_ids, kv_segment_ids, q_positions, kv_positions):
        return jax.shard_map(
            per_shard,
            mesh=mesh,
            in_specs=(q_spec, kv_spec, kv_spec, token_spec, token_spec, token_spec, token_spec),
            out_specs=q_spec,
            check_vma=False,
        )(q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions)

    return wrapped


def query_blocked(fn: AttentionFn, block_size: int) -> AttentionFn:
    """Runs `fn` over blocks of `block_size` queries against all keys, one block at a time with
    its scores rematerialized (72B at 32K tokens: 1 GiB of scores per block instead of 64 GiB).
    0, or a length that is not a multiple of it, runs one block."""

    def blocked(q, k, v, *, q_segment_ids, kv_segment_ids, q_positions, kv_positions):
        length = q.shape[1]
        if not block_size or length <= block_size or length % block_size:
            return _call(fn, q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions)
        n = length // block_size

        def split(x):
            return jnp.moveaxis(x.reshape(x.shape[0], n, block_size, *x.shape[2:]), 1, 0)

        @jax.checkpoint
        def one(blocks):
            q_block, segments, positions = blocks
            return _call(fn, q_block, k, v, segments, kv_segment_ids, positions, kv_positions)

        out = jax.lax.map(one, (split(q), split(q_segment_ids), split(q_positions)))
        return jnp.moveaxis(out, 0, 1).reshape(q.shape)

    return blocked


def sequence_sharded(
    fn: AttentionFn, *, mesh: Mesh | None, rules: logical.LogicalRules, block_size: int
) -> AttentionFn:
    return shard_mapped(query_blocked(fn, block_size), mesh, rules)
