"""Our Pallas flash attention (interpret mode on CPU) against the XLA reference: outputs and
dq, dk, dv over GQA ratios, head dims, dtypes and every row layout the model trains on; and the
block-skip predicate against the brute-force mask."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from attention_cases import (
    CASES,
    check_against_reference,
    layouts,
    outputs_and_grads,
    packed,
    positions_of,
)
from qwen_jax.kernels import block_skip, flash_tpu
from qwen_jax.kernels.xla import xla_attention
from qwen_jax.model.attention import attention_mask

BLOCKS = flash_tpu.INTERPRET_BLOCKS  # 128: lengths below are not multiples of it


def _flash(q, k, v, **tokens):
    return flash_tpu.flash_attention(q, k, v, **tokens, blocks=BLOCKS, interpret=True)


@pytest.mark.parametrize("kv_heads, groups, head_dim, dtype", CASES)
def test_outputs_and_gradients_equal_the_reference(kv_heads, groups, head_dim, dtype):
    check_against_reference(_flash, kv_heads, groups, head_dim, dtype)


def _brute_force_pairs(segments, positions, block):
    segments, positions = jnp.asarray(segments), jnp.asarray(positions)
    mask = np.asarray(attention_mask(segments, segments, positions, positions))
    batch, length, _ = mask.shape
    n = length // block
    return mask.reshape(batch, n, block, n, block).any(axis=(2, 4))


def _predicate(segments, positions, block):
    s, p = jnp.asarray(segments), jnp.asarray(positions)
    return np.asarray(block_skip.visited_pairs(s, s, p, p, block, block))


def test_skip_predicate_counts_exactly_the_pairs_with_an_unmasked_entry():
    block, length = 128, 16 * 128
    causal = np.ones((1, length), np.int32)
    rng = np.random.default_rng(3)
    packed_row = packed(rng, length, 8)[None].astype(np.int32)
    counts = {}
    for name, segments in (("causal", causal), ("packed 8 documents", packed_row)):
        positions = positions_of(segments)
        visited = _predicate(segments, positions, block)
        needed = _brute_force_pairs(segments, positions, block)
        assert int(visited.sum()) == int(needed.sum()), name
        np.testing.assert_array_equal(visited, needed, err_msg=name)
        counts[name] = int(visited.sum())
    # Causal: the lower triangle of 16 x 16 blocks; packing skips far more of it.
    assert counts["causal"] == 16 * 17 // 2
    assert counts["packed 8 documents"] < counts["causal"] // 2


def test_skip_predicate_is_exact_on_training_layouts_and_safe_on_any():
    block = 16
    for seed in range(20):
        segments, positions = layouts(8 * block, seed)
        np.testing.assert_array_equal(
            _predicate(segments, positions, block), _brute_force_pairs(segments, positions, block)
        )
        # Arbitrary ids and positions: the predicate may visit more, never fewer.
        rng = np.random.default_rng(seed)
        segments = rng.integers(0, 4, (3, 8 * block)).astype(np.int32)
        positions = rng.integers(0, 8 * block, (3, 8 * block)).astype(np.int32)
        visited = _predicate(segments, positions, block)
        assert np.all(visited | ~_brute_force_pairs(segments, positions, block)), seed


def test_skipped_blocks_are_never_read():
    """Queries of document 3 against a row of 8 block-long documents: every key and value
    outside document 3 is NaN, which any computed or copied block would spread to the output."""
    block, documents, heads, d = 128, 8, 2, 64
    kv_segments = np.repeat(np.arange(1, documents + 1), block)[None].astype(np.int32)
    kv_positions = positions_of(kv_segments)
    own = kv_segments[0] == 3
    q_segments, q_positions = kv_segments[:, own], kv_positions[:, own]
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(1, block, heads, d)), jnp.float32)
    k, v = (rng.normal(size=(1, documents * block, 1, d)) for _ in range(2))
    poisoned_k, poisoned_v = (
        jnp.asarray(np.where(own[None, :, None, None], x, np.nan)) for x in (k, v)
    )
    tokens = dict(
        q_segment_ids=jnp.asarray(q_segments),
        kv_segment_ids=jnp.asarray(kv_segments),
        q_positions=jnp.asarray(q_positions),
        kv_positions=jnp.asarray(kv_positions),
    )
    out, dq, dk, dv = outputs_and_grads(_flash, q, poisoned_k, poisoned_v, jnp.ones_like(q), tokens)
    want, dq_want, dk_want, dv_want = outputs_and_grads(
        xla_attention,
        q,
        jnp.asarray(k, jnp.float32),
        jnp.asarray(v, jnp.float32),
        jnp.ones_like(q),
        tokens,
    )
    np.testing.assert_allclose(out, want, atol=1e-5, rtol=0)
    np.testing.assert_allclose(dq, dq_want, atol=1e-5, rtol=0)
    # Key blocks no query block visits keep zero gradients.
    np.testing.assert_allclose(
        dk, np.where(own[None, :, None, None], dk_want, 0), atol=1e-5, rtol=0
    )
    np.testing.assert_allclose(
        dv, np.where(own[None, :, None, None], dv_want, 0), atol=1e-5, rtol=0
    )
