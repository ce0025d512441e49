"""Flash attention in Pallas for TPU (Mosaic), forward and backward, skipping blocks by the
runtime segment layout.

Layout: queries [batch, kv_heads, groups, length, head_dim], so one grid step holds the query
heads of a group and reads their key/value block once; K/V stay [batch, kv_heads, length,
head_dim] and are never repeated. Token segment ids and positions travel as rows [batch, 1,
length]; a kernel that needs them down the sublanes expands a row into a column.

- forward: grid (batch, kv_heads, query blocks, key steps); online softmax with float32 running
  max, sum and accumulator in VMEM scratch; writes the output and the log-sum-exp.
- dq: the same grid; probabilities recomputed from the log-sum-exp.
- dk/dv: grid (batch, kv_heads, key blocks, query steps), scores transposed ([keys, queries]) so
  that per-query statistics are rows; dk and dv accumulate over the group's heads and the
  query blocks.

The last grid axis walks a visit list from `block_skip` (scalar prefetch), so a masked pair is
neither computed nor copied. Fully masked query rows (padding) give zeros, forward and backward.
Lengths are padded to the block size with segment id 0, which the mask rule ignores.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from qwen_jax.kernels import block_skip

LANES = 128
# Finite, so that a row masked in every block it has seen stays free of inf - inf.
_MASKED = -0.7 * float(np.finfo(np.float32).max)
_NT = (((1,), (1,)), ((), ()))  # x @ y.T
_NN = (((1,), (0,)), ((), ()))  # x @ y


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Queries and keys per block, multiples of 128 (lanes), and the scoped VMEM the kernels may
    use (0: the compiler's default)."""

    q: int
    kv: int
    vmem_limit_bytes: int = 0

    def __post_init__(self):
        for size in (self.q, self.kv):
            if size <= 0 or size % LANES:
                raise ValueError(f"flash attention block sizes must be multiples of 128: {self}")


_MIB = 1 << 20
# Per TPU generation: blocks with which a group of 8 query heads at head_dim 128 compiles with
# libtpu ahead of time (tests/parallel/test_aot.py compiles the 0.5B step on v5e and v5p);
# 512-query blocks need more than the 16 MiB default scoped VMEM. Not yet tuned on hardware;
# `Runtime.flash_block_sizes` overrides.
GENERATION_BLOCKS = {
    "v4": BlockSizes(256, 512),
    "v5e": BlockSizes(256, 512),
    "v5p": BlockSizes(512, 512, 32 * _MIB),
    "v6e": BlockSizes(512, 1024, 32 * _MIB),
}
# Pallas interpret mode (CPU): small blocks keep test shapes small.
INTERPRET_BLOCKS = BlockSizes(128, 128)


def generation(device_kind: str) -> str | None:
    kind = device_kind.lower()
    if "v6" in kind:
        return "v6e"
    if "v5 lite" in kind or "v5e" in kind:
        return "v5e"
    if "v5" in kind:
        return "v5p"
    if "v4" in kind:
        return "v4"
    return None


def default_blocks(device_kind: str) -> BlockSizes:
    return GENERATION_BLOCKS.get(generation(device_kind) or "v5p", GENERATION_BLOCKS["v5p"])


def _column(row_ref):
    """A [1, n] row block as an [n, 1] column."""
    return jnp.expand_dims(row_ref[0], -1)


def _mask(q_seg, q_pos, kv_seg, kv_pos):
    return (q_seg == kv_seg) & (kv_seg != 0) & (kv_pos <= q_pos)


def _lanes(x, width):
    """[n, LANES] lane-replicated statistics broadcast to `width` lanes."""
    return x[:, :1] if width != LANES else x


def _forward_kernel(
    lists_ref, counts_ref,
    q_ref, k_ref, v_ref, q_seg_ref, q_pos_ref, kv_seg_ref, kv_pos_ref,
    o_ref, lse_ref,
    m_ref, l_ref, acc_ref,
    *, scale, groups,
):  # fmt: skip
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    q_blocks, steps = pl.num_programs(2), pl.num_programs(3)

    @pl.when(j == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, _MASKED, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when(j < counts_ref[b * q_blocks + i])
    def _compute():
        k, v = k_ref[...], v_ref[...]
        mask = _mask(_column(q_seg_ref), _column(q_pos_ref), kv_seg_ref[...], kv_pos_ref[...])
        for h in range(groups):
            s = jax.lax.dot_general(q_ref[h], k, _NT, preferred_element_type=jnp.float32)
            s = jnp.where(mask, s * scale, _MASKED)
            m_prev = m_ref[h]
            m_next = jnp.maximum(m_prev, s.max(axis=-1, keepdims=True))
            p = jnp.where(mask, jnp.exp(s - _lanes(m_next, s.shape[-1])), 0.0)
            alpha = jnp.exp(m_prev - m_next)
            m_ref[h] = m_next
            l_ref[h] = alpha * l_ref[h] + p.sum(axis=-1, keepdims=True)
            pv = jax.lax.dot_general(p.astype(v.dtype), v, _NN, preferred_element_type=jnp.float32)
            acc_ref[h] = acc_ref[h] * alpha[:, :1] + pv

    @pl.when(j == steps - 1)
    def _finish():
        for h in range(groups):
            total = l_ref[h]
            seen = total > 0
            safe = jnp.where(seen, total, 1.0)
            o_ref[h] = jnp.where(seen[:, :1], acc_ref[h] / safe[:, :1], 0.0).astype(o_ref.dtype)
            lse = jnp.where(seen, m_ref[h] + jnp.log(safe), 0.0)
            lse_ref[pl.ds(h, 1), :] = lse.T[:1, :]


def _dq_kernel(
    lists_ref, counts_ref,
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_seg_ref, q_pos_ref, kv_seg_ref, kv_pos_ref,
    dq_ref,
    acc_ref,
    *, scale, groups,
):  # fmt: skip
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    q_blocks, steps = pl.num_programs(2), pl.num_programs(3)

    @pl.when(j == 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when(j < counts_ref[b * q_blocks + i])
    def _compute():
        k, v = k_ref[...], v_ref[...]
        mask = _mask(_column(q_seg_ref), _column(q_pos_ref), kv_seg_ref[...], kv_pos_ref[...])
        for h in range(groups):
            s = jax.lax.dot_general(q_ref[h], k, _NT, preferred_element_type=jnp.float32)
            lse = jnp.expand_dims(lse_ref[h], -1)
            p = jnp.where(mask, jnp.exp(s * scale - lse), 0.0)
            dp = jax.lax.dot_general(do_ref[h], v, _NT, preferred_element_type=jnp.float32)
            ds = p * (dp - jnp.expand_dims(delta_ref[h], -1))
            acc_ref[h] += scale * jax.lax.dot_general(
                ds.astype(k.dtype), k, _NN, preferred_element_type=jnp.float32
            )

    @pl.when(j == steps - 1)
    def _finish():
        dq_ref[...] = acc_ref[...].astype(dq_ref.dtype)


def _dkv_kernel(
    lists_ref, counts_ref,
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_seg_ref, q_pos_ref, kv_seg_ref, kv_pos_ref,
    dk_ref, dv_ref,
    dk_acc_ref, dv_acc_ref,
    *, scale, groups,
):  # fmt: skip
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    kv_blocks, steps = pl.num_programs(2), pl.num_programs(3)

    @pl.when(j == 0)
    def _init():
        dk_acc_ref[...] = jnp.zeros(dk_acc_ref.shape, jnp.float32)
        dv_acc_ref[...] = jnp.zeros(dv_acc_ref.shape, jnp.float32)

    @pl.when(j < counts_ref[b * kv_blocks + i])
    def _compute():
        k, v = k_ref[...], v_ref[...]
        # Transposed: keys down the sublanes, queries along the lanes.
        mask_t = _mask(q_seg_ref[...], q_pos_ref[...], _column(kv_seg_ref), _column(kv_pos_ref))
        for h in range(groups):
            q, do = q_ref[h], do_ref[h]
            s_t = jax.lax.dot_general(k, q, _NT, preferred_element_type=jnp.float32)
            p_t = jnp.where(mask_t, jnp.exp(s_t * scale - lse_ref[pl.ds(h, 1), :]), 0.0)
            dv_acc_ref[...] += jax.lax.dot_general(
                p_t.astype(do.dtype), do, _NN, preferred_element_type=jnp.float32
            )
            dp_t = jax.lax.dot_general(v, do, _NT, preferred_element_type=jnp.float32)
            ds_t = p_t * (dp_t - delta_ref[pl.ds(h, 1), :])
            dk_acc_ref[...] += scale * jax.lax.dot_general(
                ds_t.astype(q.dtype), q, _NN, preferred_element_type=jnp.float32
            )

    @pl.when(j == steps - 1)
    def _finish():
        dk_ref[...] = dk_acc_ref[...].astype(dk_ref.dtype)
        dv_ref[...] = dv_acc_ref[...].astype(dv_ref.dtype)


@dataclasses.dataclass(frozen=True)
class _Shapes:
    batch: int
    kv_heads: int
    groups: int
    q_len: int
    kv_len: int
    head_dim: int
    blocks: BlockSizes

    @property
    def q_blocks(self):
        return self.q_len // self.blocks.q

    @property
    def kv_blocks(self):
        return self.kv_len // self.blocks.kv


def _specs(shapes: _Shapes, *, queries_outer: bool):
    """BlockSpecs for (q-like [b, kvh, g, T, d], kv [b, kvh, S, d], per-query rows [b, kvh, g, T],
    q token rows [b, 1, T], kv token rows [b, 1, S]). The outer block index is program 2; the
    other side's block comes from the visit list at program 3."""
    g, d, bq, bkv = shapes.groups, shapes.head_dim, shapes.blocks.q, shapes.blocks.kv
    inner = shapes.kv_blocks if queries_outer else shapes.q_blocks
    outer = shapes.q_blocks if queries_outer else shapes.kv_blocks

    def listed(b, i, j, lists_ref, counts_ref):
        return lists_ref[(b * outer + i) * inner + j]

    def q_block(b, h, i, j, lists_ref, counts_ref):
        return i if queries_outer else listed(b, i, j, lists_ref, counts_ref)

    def kv_block(b, h, i, j, lists_ref, counts_ref):
        return listed(b, i, j, lists_ref, counts_ref) if queries_outer else i

    q = pl.BlockSpec((None, None, g, bq, d), lambda b, h, *ij: (b, h, 0, q_block(b, h, *ij), 0))
    kv = pl.BlockSpec((None, None, bkv, d), lambda b, h, *ij: (b, h, kv_block(b, h, *ij), 0))
    rows = pl.BlockSpec((None, None, g, bq), lambda b, h, *ij: (b, h, 0, q_block(b, h, *ij)))
    q_tokens = pl.BlockSpec((None, 1, bq), lambda b, h, *ij: (b, 0, q_block(b, h, *ij)))
    kv_tokens = pl.BlockSpec((None, 1, bkv), lambda b, h, *ij: (b, 0, kv_block(b, h, *ij)))
    return q, kv, rows, q_tokens, kv_tokens


def _call(kernel, shapes, *, queries_outer, in_specs, out_specs, out_shape, scratch, interpret):
    outer = shapes.q_blocks if queries_outer else shapes.kv_blocks
    inner = shapes.kv_blocks if queries_outer else shapes.q_blocks
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(shapes.batch, shapes.kv_heads, outer, inner),
            in_specs=in_specs,
            out_specs=out_specs,
            scratch_shapes=scratch,
        ),
        out_shape=out_shape,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"),
            vmem_limit_bytes=shapes.blocks.vmem_limit_bytes or None,
        ),
        interpret=interpret,
    )


def _forward(shapes, interpret, q, k, v, tokens, lists, counts):
    q_spec, kv_spec, rows_spec, q_tok, kv_tok = _specs(shapes, queries_outer=True)
    g, bq, d = shapes.groups, shapes.blocks.q, shapes.head_dim
    call = _call(
        functools.partial(_forward_kernel, scale=shapes.head_dim**-0.5, groups=g),
        shapes,
        queries_outer=True,
        in_specs=[q_spec, kv_spec, kv_spec, q_tok, q_tok, kv_tok, kv_tok],
        out_specs=[q_spec, rows_spec],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct(q.shape[:-1], jnp.float32),
        ],
        scratch=[
            pltpu.VMEM((g, bq, LANES), jnp.float32),
            pltpu.VMEM((g, bq, LANES), jnp.float32),
            pltpu.VMEM((g, bq, d), jnp.float32),
        ],
        interpret=interpret,
    )
    return call(lists, counts, q, k, v, *tokens)


def _backward_in_specs(shapes, *, queries_outer):
    """For (q, k, v, dO, log-sum-exp, delta, q segments, q positions, kv segments, kv
    positions)."""
    q, kv, rows, q_tokens, kv_tokens = _specs(shapes, queries_outer=queries_outer)
    return [q, kv, kv, q, rows, rows, q_tokens, q_tokens, kv_tokens, kv_tokens]


def _backward(shapes, interpret, q, k, v, o, lse, do, tokens, lists, counts, lists_t, counts_t):
    scale, g, d = shapes.head_dim**-0.5, shapes.groups, shapes.head_dim
    delta = jnp.einsum("bhgtd,bhgtd->bhgt", o.astype(jnp.float32), do.astype(jnp.float32))
    operands = (q, k, v, do, lse, delta, *tokens)

    dq = _call(
        functools.partial(_dq_kernel, scale=scale, groups=g),
        shapes,
        queries_outer=True,
        in_specs=_backward_in_specs(shapes, queries_outer=True),
        out_specs=_specs(shapes, queries_outer=True)[0],
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        scratch=[pltpu.VMEM((g, shapes.blocks.q, d), jnp.float32)],
        interpret=interpret,
    )(lists, counts, *operands)

    kv_spec = _specs(shapes, queries_outer=False)[1]
    dk, dv = _call(
        functools.partial(_dkv_kernel, scale=scale, groups=g),
        shapes,
        queries_outer=False,
        in_specs=_backward_in_specs(shapes, queries_outer=False),
        out_specs=[kv_spec, kv_spec],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        scratch=[pltpu.VMEM((shapes.blocks.kv, d), jnp.float32)] * 2,
        interpret=interpret,
    )(lists_t, counts_t, *operands)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _flash(shapes, interpret, q, k, v, tokens):
    return _flash_forward(shapes, interpret, q, k, v, tokens)[0]


def _visits(shapes, tokens):
    q_seg, q_pos, kv_seg, kv_pos = (t[:, 0] for t in tokens)
    visited = block_skip.visited_pairs(
        q_seg, kv_seg, q_pos, kv_pos, shapes.blocks.q, shapes.blocks.kv
    )
    lists, counts = block_skip.visit_lists(visited)
    lists_t, counts_t = block_skip.visit_lists(jnp.swapaxes(visited, 1, 2))
    return tuple(block_skip.flat(x) for x in (lists, counts, lists_t, counts_t))


def _flash_forward(shapes, interpret, q, k, v, tokens):
    visits = _visits(shapes, tokens)
    o, lse = _forward(shapes, interpret, q, k, v, tokens, *visits[:2])
    return o, (q, k, v, o, lse, tokens, visits)


def _flash_backward(shapes, interpret, residuals, do):
    q, k, v, o, lse, tokens, visits = residuals
    dq, dk, dv = _backward(shapes, interpret, q, k, v, o, lse, do, tokens, *visits)
    return dq, dk, dv, jax.tree.map(lambda t: np.zeros(t.shape, jax.dtypes.float0), tokens)


_flash.defvjp(_flash_forward, _flash_backward)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _pad(x, axis: int, length: int):
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, length - x.shape[axis])
    return jnp.pad(x, widths)


def flash_attention(
    q, k, v, *, q_segment_ids, kv_segment_ids, q_positions, kv_positions, blocks, interpret
):
    """The model's attention signature (q [b, T, heads, d], k/v [b, S, kv_heads, d]) on the
    kernels above. Blocks larger than a (128-rounded) length shrink to it."""
    batch, q_len, heads, d = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    blocks = dataclasses.replace(
        blocks,
        q=min(blocks.q, _round_up(q_len, LANES)),
        kv=min(blocks.kv, _round_up(kv_len, LANES)),
    )
    shapes = _Shapes(
        batch=batch,
        kv_heads=kv_heads,
        groups=heads // kv_heads,
        q_len=_round_up(q_len, blocks.q),
        kv_len=_round_up(kv_len, blocks.kv),
        head_dim=d,
        blocks=blocks,
    )
    q5 = q.reshape(batch, q_len, kv_heads, shapes.groups, d).transpose(0, 2, 3, 1, 4)
    q5 = _pad(q5, 3, shapes.q_len)
    k4 = _pad(k.transpose(0, 2, 1, 3), 2, shapes.kv_len)
    v4 = _pad(v.transpose(0, 2, 1, 3), 2, shapes.kv_len)

    def row(x, length):
        return _pad(x.astype(jnp.int32), 1, length)[:, None, :]

    tokens = (
        row(q_segment_ids, shapes.q_len),
        row(q_positions, shapes.q_len),
        row(kv_segment_ids, shapes.kv_len),
        row(kv_positions, shapes.kv_len),
    )
    out = _flash(shapes, interpret, q5, k4, v4, tokens)
    return out[:, :, :, :q_len].transpose(0, 3, 1, 2, 4).reshape(batch, q_len, heads, d)
