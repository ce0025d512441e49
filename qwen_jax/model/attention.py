"""What every attention implementation computes: the mask rule and the function signature.

Implementations live in `qwen_jax.kernels` (registered in `qwen_jax.kernels.registry`). Each takes
queries [batch, q_len, q_heads, head_dim], keys and values [batch, kv_len, kv_heads, head_dim], and
per-token segment ids and positions for both. A query attends to a key when they share a non-zero
segment id and the key's position is not after the query's; this single rule covers causal
training, packed documents, left-padded batches and decoding against a KV cache.
"""

from __future__ import annotations

from typing import Protocol

import jax


class AttentionFn(Protocol):
    def __call__(
        self,
        q: jax.Array,
        k: jax.Array,
        v: jax.Array,
        *,
        q_segment_ids: jax.Array,
        kv_segment_ids: jax.Array,
        q_positions: jax.Array,
        kv_positions: jax.Array,
    ) -> jax.Array: ...


def attention_mask(q_segment_ids, kv_segment_ids, q_positions, kv_positions) -> jax.Array:
    """Boolean [batch, q_len, kv_len]."""
    same_segment = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    not_padding = (kv_segment_ids != 0)[:, None, :]
    causal = kv_positions[:, None, :] <= q_positions[:, :, None]
    return same_segment & not_padding & causal
