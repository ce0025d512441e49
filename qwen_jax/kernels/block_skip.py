"""Which (query block, key block) pairs of a batch hold at least one unmasked entry.

Computed per batch from the runtime segment ids and positions, in O(length) work: each block is
summarized by its smallest and largest non-zero segment id, the position its edge segments reach
(the earliest key of a key block's first and last segment, the latest query of a query block's
first and last segment) and its overall earliest key or latest query. A pair is visited when

- both blocks hold a real token, their segment-id ranges meet, and some key position is not
  after some query position; and
- when the ranges meet in a single id, that segment's earliest key in the key block is not
  after its latest query in the query block.

Every pair with an unmasked entry passes, whatever the layout (the tests check this on random
ones). For rows whose segment ids do not decrease along the row and whose positions increase
within a document (causal rows, packed documents, left padding) the test is exact: two different
blocks then share at most the one document that straddles them, and its edge positions decide.

The kernels read the result as visit lists: for each query block the key blocks to compute, in
order, then the last one repeated. A repeated block index makes Pallas skip the copy, so a
skipped pair costs neither compute nor K/V traffic.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_NO_SEGMENT = jnp.iinfo(jnp.int32).max


def _summarize(segment_ids, positions, block: int, *, latest: bool):
    """Per block of `block` tokens: (first, last, position at first, position at last, position
    overall), each [batch, blocks]. `latest` takes the largest position (queries), otherwise the
    smallest (keys)."""
    batch, length = segment_ids.shape
    seg = segment_ids.reshape(batch, length // block, block)
    pos = positions.reshape(batch, length // block, block)
    real = seg != 0
    first = jnp.where(real, seg, _NO_SEGMENT).min(-1)
    last = jnp.where(real, seg, 0).max(-1)
    fill = jnp.iinfo(jnp.int32).min if latest else jnp.iinfo(jnp.int32).max
    reduce = jnp.max if latest else jnp.min

    def reach(where):
        return reduce(jnp.where(where, pos, fill), axis=-1)

    return (
        first,
        last,
        reach(real & (seg == first[..., None])),
        reach(real & (seg == last[..., None])),
        reach(real),
    )


def visited_pairs(q_segment_ids, kv_segment_ids, q_positions, kv_positions, block_q, block_kv):
    """Boolean [batch, q_blocks, kv_blocks]: the pairs a kernel computes. Lengths must be
    multiples of their block sizes."""
    q_first, q_last, q_at_first, q_at_last, q_latest = (
        x[:, :, None] for x in _summarize(q_segment_ids, q_positions, block_q, latest=True)
    )
    k_first, k_last, k_at_first, k_at_last, k_earliest = (
        x[:, None, :] for x in _summarize(kv_segment_ids, kv_positions, block_kv, latest=False)
    )
    lo = jnp.maximum(q_first, k_first)
    hi = jnp.minimum(q_last, k_last)
    meet = (q_last > 0) & (k_last > 0) & (lo <= hi) & (k_earliest <= q_latest)
    # One shared id: compare that segment's own edge positions where the summaries hold them.
    key = jnp.where(lo == k_first, k_at_first, jnp.where(lo == k_last, k_at_last, k_earliest))
    query = jnp.where(lo == q_last, q_at_last, jnp.where(lo == q_first, q_at_first, q_latest))
    return meet & ((lo < hi) | (key <= query))


def visit_lists(visited):
    """For [batch, rows, cols] booleans: (lists [batch, rows, cols] int32, counts [batch, rows]).
    Row r visits lists[b, r, :counts[b, r]]; later entries repeat the last visited column (0 for
    an empty row), so that the block index does not change and nothing is copied."""
    cols = visited.shape[-1]
    counts = visited.sum(-1, dtype=jnp.int32)
    order = jnp.argsort(~visited, axis=-1, stable=True).astype(jnp.int32)
    last = jnp.take_along_axis(order, jnp.maximum(counts - 1, 0)[..., None], axis=-1)
    steps = jnp.arange(cols, dtype=jnp.int32)
    lists = jnp.where(steps < counts[..., None], order, jnp.where(counts[..., None] > 0, last, 0))
    return lists, counts


def flat(x: jax.Array) -> jax.Array:
    """Scalar-prefetch tables go to SMEM one-dimensional: a 2-D SMEM array pads its rows."""
    return x.reshape(-1)
