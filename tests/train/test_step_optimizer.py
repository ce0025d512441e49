"""Optimizer pieces the step relies on: the weight-decay mask and the schedules."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "parallel"))
import sharding_fixtures as fx  # noqa: E402
from qwen_jax.train import optimizer as optimizer_lib  # noqa: E402


def test_weight_decay_skips_norms_and_biases():
    _, params = nnx.split(nnx.eval_shape(fx.factory()), nnx.Param)
    mask = optimizer_lib.decay_mask(params.to_pure_dict())
    assert mask["layers"]["mlp"]["gate_proj"]["kernel"]
    assert mask["layers"]["self_attn"]["q_proj"]["kernel"]
    assert mask["embed_tokens"]["embedding"] and mask["lm_head"]["kernel"]
    assert not mask["layers"]["self_attn"]["q_proj"]["bias"]  # [layers, heads, head_dim]: a bias
    assert not mask["layers"]["input_layernorm"]["scale"]
    assert not mask["norm"]["scale"]


def test_adamw_decays_only_masked_parameters():
    """With zero gradients, AdamW moves decayed weights by -lr*wd*w and leaves the rest alone."""
    tx, _ = optimizer_lib.make_optimizer(optimizer_lib.constant(0.5), weight_decay=0.1)
    params = {
        "layers": {"w": np.ones((2, 3, 3), np.float32), "bias": np.ones((2, 3), np.float32)},
        "norm": {"scale": np.ones(3, np.float32)},
    }
    updates, _ = tx.update(jax.tree.map(np.zeros_like, params), tx.init(params), params)
    np.testing.assert_allclose(updates["layers"]["w"], -0.05)
    np.testing.assert_allclose(updates["layers"]["bias"], 0.0)
    np.testing.assert_allclose(updates["norm"]["scale"], 0.0)


def test_warmup_stable_decay():
    schedule = optimizer_lib.warmup_stable_decay(
        peak_lr=1.0, warmup_steps=10, stable_steps=20, decay_steps=10, floor_lr=0.1
    )
    values = [float(schedule(s)) for s in (0, 5, 10, 29, 35, 40, 100)]
    np.testing.assert_allclose(values, [0.0, 0.5, 1.0, 1.0, 0.55, 0.1, 0.1], atol=1e-6)
    # An anneal stage owning steps 30.. of the same schedule.
    stage = optimizer_lib.warmup_stable_decay(
        peak_lr=1.0, warmup_steps=10, stable_steps=20, decay_steps=10, floor_lr=0.1, step_offset=30
    )
    np.testing.assert_allclose(float(stage(5)), 0.55, atol=1e-6)
    with pytest.raises(ValueError, match="decay_shape"):
        optimizer_lib.warmup_stable_decay(peak_lr=1.0, stable_steps=1, decay_shape="exp")


def test_warmup_cosine():
    schedule = optimizer_lib.warmup_cosine(
        peak_lr=1.0, warmup_steps=10, total_steps=110, final_lr_fraction=0.1
    )
    np.testing.assert_allclose(
        [float(schedule(s)) for s in (0, 10, 60, 110)], [0.0, 1.0, 0.55, 0.1], atol=1e-6
    )
