"""The Pallas GPU flash kernel and the cuDNN path against the XLA reference.

In interpret mode on CPU (CI): outputs and dq, dk, dv within 1e-5 in float32 over the TPU
kernel's cases. On an NVIDIA GPU (skipped elsewhere): the compiled Triton kernel and cuDNN within
2e-2 of the largest entry in bfloat16.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention_cases import CASES, check_against_reference, layouts, outputs_and_grads
from qwen_jax.kernels import cudnn, flash_gpu, registry
from qwen_jax.kernels.xla import xla_attention

ON_GPU = jax.default_backend() == "gpu"


def _interpreted(q, k, v, **tokens):
    return flash_gpu.flash_attention(
        q, k, v, **tokens, blocks=flash_gpu.INTERPRET_BLOCKS, interpret=True
    )


@pytest.mark.parametrize("kv_heads, groups, head_dim, dtype", CASES)
def test_interpreted_kernel_equals_the_reference(kv_heads, groups, head_dim, dtype):
    check_against_reference(_interpreted, kv_heads, groups, head_dim, dtype)


def test_skipped_blocks_are_never_read():
    """Eight documents of two key blocks each; document 5's keys and values are NaN. A block of
    document 5 computed or read for another document's queries would spread NaN there."""
    block = flash_gpu.INTERPRET_BLOCKS.backward_kv
    documents, length, d = 8, 8 * 2 * block, 64
    segments = np.repeat(np.arange(1, documents + 1), 2 * block)[None].astype(np.int32)
    positions = np.tile(np.arange(2 * block), documents)[None].astype(np.int32)
    poisoned = segments[0] == 5
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(1, length, 2, d)), jnp.float32)
    k, v = (
        jnp.asarray(
            np.where(poisoned[None, :, None, None], np.nan, rng.normal(size=(1, length, 1, d))),
            jnp.float32,
        )
        for _ in range(2)
    )
    tokens = dict(
        q_segment_ids=jnp.asarray(segments),
        kv_segment_ids=jnp.asarray(segments),
        q_positions=jnp.asarray(positions),
        kv_positions=jnp.asarray(positions),
    )
    # Document 5's queries get no cotangent, so only its own (NaN) outputs see its keys.
    cotangent = jnp.asarray(np.where(poisoned[None, :, None, None], 0.0, 1.0) * np.ones(q.shape))
    clean = ~poisoned
    got = outputs_and_grads(_interpreted, q, k, v, cotangent, tokens)
    safe_k, safe_v = (jnp.where(jnp.isnan(x), 0.0, x) for x in (k, v))
    want = outputs_and_grads(xla_attention, q, safe_k, safe_v, cotangent, tokens)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        g, w = np.asarray(g)[:, clean], np.asarray(w)[:, clean]
        assert np.all(np.isfinite(g)), name
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=0, err_msg=name)


def test_decoding_against_a_longer_cache_uses_the_reference():
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(2, 1, 4, 64)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(2, 40, 2, 64)), jnp.float32) for _ in range(2))
    tokens = dict(
        q_segment_ids=jnp.ones((2, 1), jnp.int32),
        kv_segment_ids=jnp.ones((2, 40), jnp.int32).at[1, 30:].set(0),
        q_positions=jnp.full((2, 1), 29, jnp.int32),
        kv_positions=jnp.broadcast_to(jnp.arange(40), (2, 40)),
    )
    np.testing.assert_allclose(
        _interpreted(q, k, v, **tokens), xla_attention(q, k, v, **tokens), atol=1e-6, rtol=0
    )


def _expected_table(segments, positions, max_segments):
    """cuDNN's packed description by a plain loop over each row."""
    offsets, lengths, expressible = [], [], True
    for ids, pos in zip(segments, positions):
        starts = [t for t in range(len(ids)) if ids[t] and (t == 0 or ids[t] != ids[t - 1])]
        sizes = []
        for n, start in enumerate(starts):
            end = start
            while end < len(ids) and ids[end] == ids[start]:
                end += 1
            sizes.append(end - start)
            expressible &= list(pos[start:end]) == list(range(end - start))
            expressible &= all(ids[start] > i for i in ids[:start])
        expressible &= len(starts) <= max_segments
        starts, sizes = starts[:max_segments], sizes[:max_segments]
        offsets.append(starts + [-1] * (max_segments + 1 - len(starts)))
        lengths.append(sizes + [-1] * (max_segments - len(sizes)))
    return np.array(offsets), np.array(lengths), expressible


@pytest.mark.parametrize(
    "name",
    ["training layouts", "a document id twice", "positions not from 0", "too many documents"],
)
def test_cudnn_document_table(name):
    segments, positions = layouts(64)
    max_segments = 12
    if name == "a document id twice":
        segments[1, 40:44] = 2
        positions[1, 40:44] = np.arange(4)
    elif name == "positions not from 0":
        positions[0] += 3
    elif name == "too many documents":
        max_segments = 8
    offsets, lengths, expressible = cudnn.document_table(
        jnp.asarray(segments), jnp.asarray(positions), max_segments
    )
    want_offsets, want_lengths, want_expressible = _expected_table(
        segments, positions, max_segments
    )
    assert bool(expressible) == want_expressible == (name == "training layouts")
    if want_expressible:  # otherwise the kernel runs and the table is not read
        np.testing.assert_array_equal(offsets, want_offsets)
        np.testing.assert_array_equal(lengths, want_lengths)


def test_cudnn_outside_a_gpu_is_one_clear_error():
    if ON_GPU:
        pytest.skip("runs on a GPU here")
    with pytest.raises(ValueError, match="cudnn.*NVIDIA GPUs"):
        registry.attention_fn("cudnn", mesh=None, rules=None, block_size=0)


GPU_CASES = sorted({(kv, g, d) for kv, g, d, _ in CASES})


@pytest.mark.skipif(not ON_GPU, reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("name", ["pallas", "cudnn"])
@pytest.mark.parametrize("kv_heads, groups, head_dim", GPU_CASES)
def test_compiled_on_the_gpu_equals_the_reference(name, kv_heads, groups, head_dim):
    fn = registry.attention_fn(name, mesh=None, rules=None, block_size=0)
    check_against_reference(fn, kv_heads, groups, head_dim, "bfloat16", length=1000)


@pytest.mark.skipif(not ON_GPU, reason="needs an NVIDIA GPU")
def test_cudnn_hands_a_layout_it_cannot_express_to_the_kernel():
    segments, positions = layouts(1000)
    positions = positions + 1  # documents not starting at position 0
    fn = registry.attention_fn("cudnn", mesh=None, rules=None, block_size=0)
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(5, 1000, 4, 128)), jnp.bfloat16)
    k, v = (jnp.asarray(rng.normal(size=(5, 1000, 2, 128)), jnp.bfloat16) for _ in range(2))
    tokens = dict(
        q_segment_ids=jnp.asarray(segments),
        kv_segment_ids=jnp.asarray(segments),
        q_positions=jnp.asarray(positions),
        kv_positions=jnp.asarray(positions),
    )
    real = (segments != 0)[:, :, None, None]
    got = np.where(real, np.asarray(jax.jit(lambda *a: fn(*a, **tokens))(q, k, v), np.float32), 0)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    want = np.where(real, np.asarray(xla_attention(*f32, **tokens)), 0)
    assert np.max(np.abs(got - want)) / np.max(np.abs(want)) <= 2e-2
