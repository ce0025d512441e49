"""Token sampling against its definitions, and the checks `generate` makes on its inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qwen_jax.model.config import QwenConfig
from qwen_jax.model.generate import Sampling, filter_logits, generate, sample
from qwen_jax.model.transformer import Qwen2ForCausalLM


def reference_filter(logits: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
    """Top-k then nucleus filtering written from the definitions, one row at a time."""
    out = np.full_like(logits, -np.inf)
    for r, row in enumerate(logits):
        order = np.argsort(-row)
        keep = order[:top_k] if top_k else order
        probs = np.exp(row[keep] - row[keep].max())
        probs /= probs.sum()
        # Nucleus: the smallest prefix of the most likely tokens whose mass reaches top_p.
        count = int(np.searchsorted(np.cumsum(probs), top_p) + 1) if top_p < 1 else len(keep)
        out[r, keep[:count]] = row[keep[:count]]
    return out


@pytest.mark.parametrize(
    "top_k,top_p", [(0, 1.0), (5, 1.0), (0, 0.5), (0, 0.9), (7, 0.8), (1, 1.0), (0, 1e-6)]
)
def test_filter_matches_definition(top_k, top_p):
    logits = np.random.RandomState(top_k).normal(0, 2, (6, 40)).astype(np.float32)
    got = np.asarray(filter_logits(jnp.asarray(logits), top_k, top_p))
    np.testing.assert_array_equal(
        np.isfinite(got), np.isfinite(reference_filter(logits, top_k, top_p))
    )
    np.testing.assert_array_equal(got[np.isfinite(got)], logits[np.isfinite(got)])


def test_sampling_frequencies_follow_the_filtered_softmax():
    logits = jnp.asarray([[2.0, 1.5, 1.0, 0.2, -0.5, -1.0, -3.0, 0.7]])
    sampling = Sampling(temperature=0.7, top_k=6, top_p=0.9)
    n = 40_000
    keys = jax.random.split(jax.random.key(3), n)
    draws = np.asarray(jax.vmap(lambda k: sample(logits, k, sampling))(keys))[:, 0]
    filtered = reference_filter(np.asarray(logits) / 0.7, 6, 0.9)[0]
    expected = np.exp(filtered - filtered.max())
    expected /= expected.sum()
    observed = np.bincount(draws, minlength=8) / n
    # Five binomial standard deviations per token; filtered-out tokens must never appear.
    sigma = np.sqrt(expected * (1 - expected) / n)
    assert np.all(np.abs(observed - expected) <= 5 * sigma + 1e-12), (observed, expected)
    assert expected.min() == 0 and observed[expected == 0].sum() == 0


def test_greedy_is_argmax_and_top_k_one_is_greedy():
    logits = jax.random.normal(jax.random.key(0), (4, 50))
    greedy = sample(logits, jax.random.key(1), Sampling())
    np.testing.assert_array_equal(greedy, jnp.argmax(logits, -1))
    np.testing.assert_array_equal(sample(logits, jax.random.key(2), Sampling(1.0, top_k=1)), greedy)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(temperature=-1.0), "temperature"),
        (dict(top_k=-2), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
    ],
)
def test_bad_sampling_values_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Sampling(**kwargs)


@pytest.fixture(scope="module")
def tiny_model():
    config = QwenConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
    )
    # Random values into the abstract model: skips the initializers' compilations, and a wide
    # normal gives every parameter (biases, norms) a say in the result.
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Qwen2ForCausalLM(config, rngs=nnx.Rngs(0))))
    rng = np.random.RandomState(0)
    return nnx.merge(
        graphdef,
        jax.tree.map(lambda x: jnp.asarray(rng.normal(0, 0.2, x.shape).astype(x.dtype)), state),
    )


def test_right_padding_is_rejected(tiny_model):
    ids = jnp.ones((2, 5), jnp.int32)
    mask = jnp.asarray([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    with pytest.raises(ValueError, match="left-padded"):
        generate(tiny_model, ids, mask, max_new_tokens=3, stop_tokens=[0])


def test_missing_stop_tokens_are_rejected(tiny_model):
    ids = jnp.ones((1, 5), jnp.int32)
    with pytest.raises(ValueError, match="stop_tokens"):
        generate(tiny_model, ids, jnp.ones_like(ids), max_new_tokens=3, stop_tokens=[])


def test_cached_greedy_decoding_equals_recomputing_the_whole_sequence(tiny_model):
    """Each greedy token is the argmax of a full, cache-free forward pass over everything before
    it: the KV cache changes nothing but the cost."""
    ids = jax.random.randint(jax.random.key(5), (2, 7), 0, 64)
    mask = jnp.ones_like(ids)
    tokens, _ = generate(tiny_model, ids, mask, max_new_tokens=6, stop_tokens=[-1])
    sequence = jnp.concatenate([ids, tokens], axis=1)
    logits = tiny_model(sequence)
    np.testing.assert_array_equal(jnp.argmax(logits[:, 6:-1], -1), tokens)
