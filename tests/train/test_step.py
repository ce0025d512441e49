"""Gradient accumulation equals one big batch; non-finite steps are dropped and counted."""

from __future__ import annotations

import pathlib
import sys

import jax
import numpy as np
import optax
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "parallel"))
import sharding_fixtures as fx  # noqa: E402
from qwen_jax.parallel import mesh as mesh_lib  # noqa: E402


def test_microbatches_equal_one_big_batch():
    """4 microbatches of 4 vs one batch of 16 on an fsdp=4 x data=2 mesh. Plain SGD with lr 1 makes
    the parameter change equal to the gradient, so this compares gradients to 1e-6."""
    mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(data=2, fsdp=4))
    rules = fx.rules_from_gin()
    batch = fx.host_batch(batch=32, seed=3)
    sgd = (optax.sgd(1.0), None)
    results = []
    for k in (1, 4):
        state, step, device_batch = fx.build(mesh, rules, microbatches=k, opt=sgd, batch=batch)
        before = fx.to_host(state.params)
        state, metrics = step(state, device_batch)
        delta = jax.tree.map(lambda new, old: np.asarray(new) - old, state.params, before)
        results.append((fx.to_host(metrics), delta))
    (m1, d1), (m4, d4) = results
    for key in ("loss", "grad_norm", "weight", "tokens"):
        np.testing.assert_allclose(m4[key], m1[key], rtol=1e-6, atol=1e-6)
    assert float(m1["grad_norm"]) > 1e-3
    for a, b in zip(jax.tree.leaves(d4), jax.tree.leaves(d1)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("policy", ["skip", "stop"])
def test_nonfinite_step_is_not_applied(policy):
    mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(fsdp=8))
    rules = fx.rules_from_gin()
    batch = fx.host_batch()
    batch["loss_mask"] = batch["loss_mask"] * np.float32(np.nan)
    state, step, device_batch = fx.build(mesh, rules, batch=batch, nan_policy=policy)
    before = fx.to_host(state.params)
    state, metrics = step(state, device_batch)
    assert bool(metrics["nonfinite"]) and int(state.step) == 0
    assert int(state.skipped) == (1 if policy == "skip" else 0)
    for a, b in zip(jax.tree.leaves(fx.to_host(state.params)), jax.tree.leaves(before)):
        np.testing.assert_array_equal(a, b)
