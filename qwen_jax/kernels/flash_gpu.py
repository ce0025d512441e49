"""Flash attention in Pallas for NVIDIA GPUs (the Triton lowering), forward and backward, skipping
blocks by the runtime segment layout: the GPU side of `attention_impl='pallas'`.

The model's layout stays as it is: queries [batch, length, heads, head_dim], keys and values
[batch, length, kv_heads, head_dim]. A query head reads its group's key/value head through the
BlockSpec index map (head // groups), so K/V are never repeated in memory.

- forward: one program per (query head, query block, batch row); it walks the key blocks of its
  visit list with an online softmax (float32 running max, sum and accumulator in registers) and
  writes the output and the log-sum-exp.
- dq: the same programs, probabilities recomputed from the log-sum-exp.
- dk/dv: one program per (KV head, key block, batch row); for each query head of the group it
  walks the query blocks that see this key block, scores transposed ([keys, queries]).

Visit lists come from `block_skip` (the TPU kernel's predicate): row r of a table holds the count
and then the blocks to visit, so a masked pair costs neither compute nor memory traffic. Unlike
the TPU kernel, a loop bound here is a runtime scalar, so a program stops after its count.
Fully masked query rows (padding) give zeros, forward and backward. Lengths are padded to the
block size with segment id 0, which the mask rule ignores.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from qwen_jax.kernels import block_skip, xla

# Finite, so that a row masked in every block it has seen stays free of inf - inf.
_MASKED = -0.7 * float(np.finfo(np.float32).max)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Queries and keys per block for the forward pass and for both backward kernels (powers of
    two, as Triton tiles are), and the Triton launch settings."""

    q: int = 64
    kv: int = 64
    backward_q: int = 64
    backward_kv: int = 64
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self):
        for size in (self.q, self.kv, self.backward_q, self.backward_kv):
            if size < 16 or size & (size - 1):
                raise ValueError(f"GPU flash attention blocks must be powers of two >= 16: {self}")


# Measured on an H100 at head_dim 128 (docs/results.md, "GPU attention"); `flash_block_sizes`
# overrides.
DEFAULT_BLOCKS = BlockSizes()
# Interpret mode (CPU): small blocks, so that test lengths span several of them.
INTERPRET_BLOCKS = BlockSizes(q=32, kv=16, backward_q=16, backward_kv=32)


_NN = (((1,), (0,)), ((), ()))  # x @ y
_NT = (((1,), (1,)), ((), ()))  # x @ y.T


def _dot(x, y, dims=_NN):
    return jax.lax.dot_general(x, y, dims, preferred_element_type=jnp.float32)


def _mask(q_seg, q_pos, kv_seg, kv_pos):
    return (q_seg == kv_seg) & (kv_seg != 0) & (kv_pos <= q_pos)


def _forward_kernel(
    q_ref, k_ref, v_ref, q_seg_ref, q_pos_ref, kv_seg_ref, kv_pos_ref, visits_ref,
    o_ref, lse_ref,
    *, scale, block_kv,
):  # fmt: skip
    block_q, head_dim = q_ref.shape
    rows = pl.ds(pl.program_id(1) * block_q, block_q)
    q = q_ref[...]
    q_seg, q_pos = q_seg_ref[rows][:, None], q_pos_ref[rows][:, None]

    def visit(step, carry):
        acc, m, total = carry
        keys = pl.ds(visits_ref[1 + step] * block_kv, block_kv)
        mask = _mask(q_seg, q_pos, kv_seg_ref[keys][None, :], kv_pos_ref[keys][None, :])
        s = jnp.where(mask, _dot(q, k_ref[keys, :], _NT) * scale, _MASKED)
        m_next = jnp.maximum(m, s.max(axis=-1))
        p = jnp.where(mask, jnp.exp(s - m_next[:, None]), 0.0)
        alpha = jnp.exp(m - m_next)
        v = v_ref[keys, :]
        acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v)
        return acc, m_next, alpha * total + p.sum(axis=-1)

    acc, m, total = jax.lax.fori_loop(
        0,
        visits_ref[0],
        visit,
        (
            jnp.zeros((block_q, head_dim), jnp.float32),
            jnp.full((block_q,), _MASKED, jnp.float32),
            jnp.zeros((block_q,), jnp.float32),
        ),
    )
    seen = total > 0
    safe = jnp.where(seen, total, 1.0)
    o_ref[...] = jnp.where(seen[:, None], acc / safe[:, None], 0.0).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m + jnp.log(safe), 0.0)


def _dq_kernel(
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
    q_seg_ref, q_pos_ref, kv_seg_ref, kv_pos_ref, visits_ref,
    dq_ref,
    *, scale, block_kv,
):  # fmt: skip
    block_q, head_dim = q_ref.shape
    rows = pl.ds(pl.program_id(1) * block_q, block_q)
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]
    q_seg, q_pos = q_seg_ref[rows][:, None], q_pos_ref[rows][:, None]

    def visit(step, acc):
        keys = pl.ds(visits_ref[1 + step] * block_kv, block_kv)
        k, v = k_ref[keys, :], v_ref[keys, :]
        mask = _mask(q_seg, q_pos, kv_seg_ref[keys][None, :], kv_pos_ref[keys][None, :])
        p = jnp.where(mask, jnp.exp(_dot(q, k, _NT) * scale - lse), 0.0)
        ds = p * (_dot(do, v, _NT) - delta)
        return acc + _dot(ds.astype(k.dtype), k)

    acc = jax.lax.fori_loop(0, visits_ref[0], visit, jnp.zeros((block_q, head_dim), jnp.float32))
    dq_ref[...] = (acc * scale).astype(dq_ref.dtype)


def _dkv_kernel(
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
    q_seg_ref, q_pos_ref, kv_seg_ref, kv_pos_ref, visits_ref,
    dk_ref, dv_ref,
    *, scale, block_q, groups,
):  # fmt: skip
    block_kv, head_dim = k_ref.shape
    keys = pl.ds(pl.program_id(1) * block_kv, block_kv)
    k, v = k_ref[...], v_ref[...]
    kv_seg, kv_pos = kv_seg_ref[keys][:, None], kv_pos_ref[keys][:, None]

    def visit_for(head):
        def visit(step, carry):
            dk, dv = carry
            rows = pl.ds(visits_ref[1 + step] * block_q, block_q)
            q, do = q_ref[rows, head, :], do_ref[rows, head, :]
            mask_t = _mask(q_seg_ref[rows][None, :], q_pos_ref[rows][None, :], kv_seg, kv_pos)
            s_t = _dot(k, q, _NT) * scale
            p_t = jnp.where(mask_t, jnp.exp(s_t - lse_ref[head, rows][None, :]), 0.0)
            dv = dv + _dot(p_t.astype(do.dtype), do)
            ds_t = p_t * (_dot(v, do, _NT) - delta_ref[head, rows][None, :])
            return dk + _dot(ds_t.astype(q.dtype), q), dv

        return visit

    carry = (jnp.zeros((block_kv, head_dim), jnp.float32),) * 2
    # The group's query heads in turn: each adds its share to this KV head's gradients.
    for head in range(groups):
        carry = jax.lax.fori_loop(0, visits_ref[0], visit_for(head), carry)
    dk, dv = carry
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


@dataclasses.dataclass(frozen=True)
class _Shapes:
    batch: int
    length: int
    heads: int
    kv_heads: int
    head_dim: int
    blocks: BlockSizes

    @property
    def groups(self):
        return self.heads // self.kv_heads


def _visit_table(tokens, block_q, block_kv, *, queries_outer):
    """[batch, outer blocks, 1 + inner blocks] int32: each outer block's count, then its list."""
    q_seg, q_pos, kv_seg, kv_pos = tokens
    visited = block_skip.visited_pairs(q_seg, kv_seg, q_pos, kv_pos, block_q, block_kv)
    lists, counts = block_skip.visit_lists(
        visited if queries_outer else jnp.swapaxes(visited, 1, 2)
    )
    return jnp.concatenate([counts[..., None], lists], axis=-1)


def _token_specs(length):
    return [pl.BlockSpec((None, length), lambda *grid: (grid[-1], 0))] * 4


def _table_spec(table):
    return pl.BlockSpec((None, None, table.shape[-1]), lambda h, i, b: (b, i, 0))


def _call(kernel, shapes, grid, in_specs, out_specs, out_shape, interpret):
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(
            num_warps=shapes.blocks.num_warps, num_stages=shapes.blocks.num_stages
        ),
        interpret=interpret,
    )


def _query_side_specs(shapes, block_q):
    """For a query block of one head: q-like [b, T, heads, d], per-query rows [b, heads, T], and
    the whole sequence of its KV head [b, S, kv_heads, d]."""
    g, d, length = shapes.groups, shapes.head_dim, shapes.length
    q = pl.BlockSpec((None, block_q, None, d), lambda h, i, b: (b, i, h, 0))
    rows = pl.BlockSpec((None, None, block_q), lambda h, i, b: (b, h, i))
    kv = pl.BlockSpec((None, length, None, d), lambda h, i, b: (b, 0, h // g, 0))
    return q, rows, kv


def _forward(shapes, interpret, q, k, v, tokens):
    blocks = shapes.blocks
    table = _visit_table(tokens, blocks.q, blocks.kv, queries_outer=True)
    q_spec, rows_spec, kv_spec = _query_side_specs(shapes, blocks.q)
    batch, length = shapes.batch, shapes.length
    return _call(
        functools.partial(_forward_kernel, scale=shapes.head_dim**-0.5, block_kv=blocks.kv),
        shapes,
        grid=(shapes.heads, length // blocks.q, batch),
        in_specs=[q_spec, kv_spec, kv_spec, *_token_specs(length), _table_spec(table)],
        out_specs=[q_spec, rows_spec],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((batch, shapes.heads, length), jnp.float32),
        ],
        interpret=interpret,
    )(q, k, v, *tokens, table)


def _backward(shapes, interpret, q, k, v, o, lse, do, tokens):
    blocks, scale, g, d = shapes.blocks, shapes.head_dim**-0.5, shapes.groups, shapes.head_dim
    batch, length, kv_heads = shapes.batch, shapes.length, shapes.kv_heads
    bq, bkv = blocks.backward_q, blocks.backward_kv
    delta = jnp.einsum("bthd,bthd->bht", o.astype(jnp.float32), do.astype(jnp.float32))

    table = _visit_table(tokens, bq, bkv, queries_outer=True)
    q_spec, rows_spec, kv_spec = _query_side_specs(shapes, bq)
    dq = _call(
        functools.partial(_dq_kernel, scale=scale, block_kv=bkv),
        shapes,
        grid=(shapes.heads, length // bq, batch),
        in_specs=[
            q_spec,
            kv_spec,
            kv_spec,
            q_spec,
            rows_spec,
            rows_spec,
            *_token_specs(length),
            _table_spec(table),
        ],  # fmt: skip
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        interpret=interpret,
    )(q, k, v, do, lse, delta, *tokens, table)

    # Per KV head: its group's queries, whole sequences, as [b, T, kv_heads, groups, d].
    table_t = _visit_table(tokens, bq, bkv, queries_outer=False)
    group_q = pl.BlockSpec((None, length, None, g, d), lambda h, i, b: (b, 0, h, 0, 0))
    group_rows = pl.BlockSpec((None, None, g, length), lambda h, i, b: (b, h, 0, 0))
    kv_block = pl.BlockSpec((None, bkv, None, d), lambda h, i, b: (b, i, h, 0))

    def grouped(x):
        return x.reshape(*x.shape[:2], kv_heads, g, *x.shape[3:])

    dk, dv = _call(
        functools.partial(_dkv_kernel, scale=scale, block_q=bq, groups=g),
        shapes,
        grid=(kv_heads, length // bkv, batch),
        in_specs=[
            group_q, kv_block, kv_block, group_q, group_rows, group_rows,
            *_token_specs(length), _table_spec(table_t),
        ],  # fmt: skip
        out_specs=[kv_block, kv_block],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        interpret=interpret,
    )(
        grouped(q), k, v, grouped(do),
        lse.reshape(batch, kv_heads, g, length), delta.reshape(batch, kv_heads, g, length),
        *tokens, table_t,
    )  # fmt: skip
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _flash(shapes, interpret, q, k, v, tokens):
    return _forward(shapes, interpret, q, k, v, tokens)[0]


def _flash_forward(shapes, interpret, q, k, v, tokens):
    o, lse = _forward(shapes, interpret, q, k, v, tokens)
    return o, (q, k, v, o, lse, tokens)


def _flash_backward(shapes, interpret, residuals, do):
    q, k, v, o, lse, tokens = residuals
    dq, dk, dv = _backward(shapes, interpret, q, k, v, o, lse, do, tokens)
    return dq, dk, dv, jax.tree.map(lambda t: np.zeros(t.shape, jax.dtypes.float0), tokens)


_flash.defvjp(_flash_forward, _flash_backward)


def flash_attention(
    q, k, v, *, q_segment_ids, kv_segment_ids, q_positions, kv_positions, blocks, interpret
):
    """The model's attention signature on the kernels above. Queries shorter than the keys
    (decoding against a KV cache, a sequence-sharded block of queries) go to the reference: the
    kernels index queries and keys by the same blocks."""
    batch, length, heads, head_dim = q.shape
    if k.shape[1] != length:
        return xla.xla_attention(
            q,
            k,
            v,
            q_segment_ids=q_segment_ids,
            kv_segment_ids=kv_segment_ids,
            q_positions=q_positions,
            kv_positions=kv_positions,
        )
    padded = -(-length // max(blocks.q, blocks.kv, blocks.backward_q, blocks.backward_kv))
    padded *= max(blocks.q, blocks.kv, blocks.backward_q, blocks.backward_kv)
    shapes = _Shapes(batch, padded, heads, k.shape[2], head_dim, blocks)

    def pad(x):
        widths = [(0, 0)] * x.ndim
        widths[1] = (0, padded - length)
        return jnp.pad(x, widths)

    tokens = tuple(
        pad(t.astype(jnp.int32)) for t in (q_segment_ids, q_positions, kv_segment_ids, kv_positions)
    )
    return _flash(shapes, interpret, pad(q), pad(k), pad(v), tokens)[:, :length]
