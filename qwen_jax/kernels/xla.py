"""Attention as plain XLA ops: the reference every other implementation is tested against.

The [batch, heads, q_len, kv_len] scores are materialized in float32; query heads of a group
share their key/value head through a reshape, so K/V are never repeated.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qwen_jax.model.attention import attention_mask


def xla_attention(q, k, v, *, q_segment_ids, kv_segment_ids, q_positions, kv_positions):
    batch, q_len, q_heads, head_dim = q.shape
    kv_heads = k.shape[2]
    groups = q_heads // kv_heads
    # Query heads of one group share a KV head: [b, t, kv_heads, groups, d].
    q = q.reshape(batch, q_len, kv_heads, groups, head_dim)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = scores * (head_dim**-0.5)
    mask = attention_mask(q_segment_ids, kv_segment_ids, q_positions, kv_positions)
    # A finite floor keeps fully masked rows (padding queries) free of NaN.
    scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(batch, q_len, q_heads, head_dim).astype(q.dtype)
