"""The attention computation, behind one registry that kernels plug into.

Every implementation has the signature of `xla_attention`: queries [batch, q_len, q_heads, head_dim],
keys and values [batch, kv_len, kv_heads, head_dim], and per-token segment ids and positions for
both. A query attends to a key when they share a non-zero segment id and the key's position is not
after the query's; this single rule covers causal training, packed documents, left-padded batches
and decoding against a KV cache.
"""

from __future__ import annotations

from typing import Callable, Protocol

import jax
import jax.numpy as jnp


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


_IMPLEMENTATIONS: dict[str, AttentionFn] = {}


def register(name: str) -> Callable[[AttentionFn], AttentionFn]:
    def wrap(fn: AttentionFn) -> AttentionFn:
        _IMPLEMENTATIONS[name] = fn
        return fn

    return wrap


def get(name: str) -> AttentionFn:
    if name not in _IMPLEMENTATIONS:
        raise ValueError(
            f"unknown attention implementation {name!r}; known: {sorted(_IMPLEMENTATIONS)}"
        )
    return _IMPLEMENTATIONS[name]


def attention_mask(q_segment_ids, kv_segment_ids, q_positions, kv_positions) -> jax.Array:
    """Boolean [batch, q_len, kv_len]."""
    same_segment = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    not_padding = (kv_segment_ids != 0)[:, None, :]
    causal = kv_positions[:, None, :] <= q_positions[:, :, None]
    return same_segment & not_padding & causal


@register("xla")
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
