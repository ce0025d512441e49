"""JAX's splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`) behind the model's
attention signature, so that it compiles inside the same train step as ours for comparison.

Splash masks with a causal mask over token indices fixed at trace time plus segment ids at run
time; it skips only blocks that the static causal mask removes. That equals the model's rule for
self-attention over rows whose positions increase within a document (training rows: causal,
packed, left-padded), which is where it is offered: it refuses keys longer or shorter than the
queries (a sharded sequence axis, a KV cache). Padding queries (segment 0) attend to each other
in splash; their outputs are zeroed to match the other implementations.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

from qwen_jax.kernels.flash_tpu import LANES, BlockSizes


def _kernel(heads: int, length: int, block_q: int, block_kv: int, interpret: bool):
    causal = masks.MultiHeadMask([masks.CausalMask((length, length))] * heads)
    # Splash's default structure, as ours: separate dq and dk/dv kernels (its fused backward keeps
    # a float32 dq per key block).
    sizes = splash.BlockSizes(
        block_q=block_q,
        block_kv=block_kv,
        block_q_dkv=block_q,
        block_kv_dkv=block_kv,
        block_q_dq=block_q,
        block_kv_dq=block_kv,
    )
    return splash.make_splash_mha(
        causal, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret
    )


def splash_attention(
    q, k, v, *, q_segment_ids, kv_segment_ids, q_positions, kv_positions, blocks: BlockSizes,
    interpret: bool,
):  # fmt: skip
    del q_positions, kv_positions  # causal by token index; see the module docstring
    batch, length, heads, head_dim = q.shape
    if k.shape[1] != length:
        raise ValueError(
            "attention_impl='splash' needs keys as long as the queries (no sequence sharding, no "
            f"KV cache); got {length} queries and {k.shape[1]} keys"
        )
    padded = -(-length // LANES) * LANES
    block_q, block_kv = min(blocks.q, padded), min(blocks.kv, padded)
    padded = -(-padded // max(block_q, block_kv)) * max(block_q, block_kv)

    def heads_first(x):
        return jnp.pad(x, ((0, 0), (0, padded - length), (0, 0), (0, 0))).transpose(0, 2, 1, 3)

    def ids(x):
        return jnp.pad(x.astype(jnp.int32), ((0, 0), (0, padded - length)))

    kernel = _kernel(heads, padded, block_q, block_kv, interpret)
    segments = splash.SegmentIds(q=ids(q_segment_ids), kv=ids(kv_segment_ids))
    # Splash takes queries already scaled.
    out = jax.vmap(kernel)(
        heads_first(q * jnp.asarray(head_dim**-0.5, q.dtype)), heads_first(k), heads_first(v),
        segment_ids=segments,
    )  # fmt: skip
    out = out.transpose(0, 2, 1, 3)[:, :length]
    return jnp.where((q_segment_ids != 0)[:, :, None, None], out, 0).astype(q.dtype)
