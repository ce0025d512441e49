"""Attention as plain XLA ops: the reference every other implementation is tested against.

The [batch, heads, q_len, kv_len] scores are materialized in float32; query heads of a group
share their key/value head through a reshape, so K/V are never repeated.

Heads are moved before the sequence axes first, so both products are plain batched matrix
products and no [.., q_len, kv_len] array is transposed. The scores are not kept for the backward
pass: it recomputes them from q and k (one more q·kᵀ), as flash attention does, instead of storing
and re-reading two float32 [batch, heads, q_len, kv_len] arrays per layer, which cost more time on
a CPU than the product and at long sequences more memory than the whole model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qwen_jax.model.attention import attention_mask


@jax.checkpoint
def xla_attention(q, k, v, *, q_segment_ids, kv_segment_ids, q_positions, kv_positions):
    batch, q_len, q_heads, head_dim = q.shape
    kv_heads = k.shape[2]
    groups = q_heads // kv_heads
    # Query heads of one group share a KV head:
    # q [b, kv_heads, groups, t, d], k and v [b, kv_heads, s, d].
    q = q.reshape(batch, q_len, kv_heads, groups, head_dim).transpose(0, 2, 3, 1, 4)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    scores = jnp.einsum("bkgtd,bksd->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = scores * (head_dim**-0.5)
    mask = attention_mask(q_segment_ids, kv_segment_ids, q_positions, kv_positions)
    # A finite floor keeps fully masked rows (padding queries) free of NaN.
    scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bksd->bkgtd", probs, v, preferred_element_type=jnp.float32)
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, q_len, q_heads, head_dim).astype(q.dtype)
