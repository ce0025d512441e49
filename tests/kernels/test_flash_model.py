"""The model with our Pallas kernel (`pallas`) or JAX's splash (`splash`), both in interpret mode,
gives the logits and loss gradients it gives with the XLA reference, packed documents and padding
included."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from qwen_jax.model.config import QwenConfig
from qwen_jax.model.layers import Runtime
from qwen_jax.model.transformer import Qwen2ForCausalLM
from qwen_jax.train.step import lm_loss_fn

# head_dim 64 as in the 0.5B preset; 7 query heads per KV head as in 0.5B and 7B.
CONFIG = QwenConfig(
    hidden_size=448,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=7,
    num_key_value_heads=1,
    vocab_size=128,
    initializer_range=0.05,
)
LENGTH = 150  # not a multiple of the 128-token interpret-mode block


def _batch():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, CONFIG.vocab_size, (2, LENGTH + 1)).astype(np.int32)
    # Row 0: three packed documents; row 1: left padding, then one document.
    segments = np.stack(
        [np.repeat([1, 2, 3], [60, 1, LENGTH - 61]), np.where(np.arange(LENGTH) < 40, 0, 1)]
    ).astype(np.int32)
    positions = np.stack(
        [
            np.concatenate([np.arange(60), [0], np.arange(LENGTH - 61)]),
            np.maximum(np.arange(LENGTH) - 40, 0),
        ]
    ).astype(np.int32)
    loss_mask = (segments != 0).astype(np.float32)
    return {
        "inputs": ids[:, :-1],
        "targets": ids[:, 1:],
        "loss_mask": loss_mask,
        "segment_ids": segments,
        "positions": positions,
    }


def _logits_and_grads(impl: str):
    model = Qwen2ForCausalLM(CONFIG, Runtime(attention_impl=impl), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    batch = _batch()

    def loss(params):
        loss_sum, aux = lm_loss_fn(nnx.merge(graphdef, params), batch)
        return loss_sum / aux["weight"]

    @jax.jit
    def run(params):
        logits = nnx.merge(graphdef, params)(
            batch["inputs"], batch["positions"], batch["segment_ids"]
        )
        return logits, jax.grad(loss)(params)

    logits, grads = run(params)
    return np.asarray(logits)[batch["segment_ids"] != 0], grads


@pytest.fixture(scope="module")
def reference():
    return _logits_and_grads("xla")


@pytest.mark.parametrize("impl", ["pallas", "splash"])
def test_model_logits_and_gradients_equal_xla(impl, reference):
    logits, grads = _logits_and_grads(impl)
    want_logits, want_grads = reference
    np.testing.assert_allclose(logits, want_logits, atol=1e-5, rtol=0)
    leaves = jax.tree.leaves_with_path(grads)
    for (path, got), want in zip(leaves, jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0, err_msg=jax.tree_util.keystr(path))
    # Every parameter received a gradient: the comparison is not of zeros.
    assert all(np.abs(np.asarray(g)).max() > 0 for g in jax.tree.leaves(want_grads))
