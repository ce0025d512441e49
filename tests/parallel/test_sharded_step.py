"""The sharded step equals the single-device step, shards what the rules say, and gathers each
stacked parameter only one layer at a time inside the scan."""

from __future__ import annotations

import re

import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import sharding_fixtures as fx
from qwen_jax.parallel import mesh as mesh_lib

STEPS = 3
TOLERANCE = 1e-5


def _run(mesh, rules, attention_impl="xla"):
    state, step, batch = fx.build(mesh, rules, attention_impl=attention_impl)
    losses = []
    for _ in range(STEPS):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert not bool(metrics["nonfinite"])
    return state, step, batch, losses


@pytest.fixture(scope="module")
def rules():
    return fx.rules_from_gin()


@pytest.fixture(scope="module")
def reference(rules):
    mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(fsdp=1), jax.devices()[:1])
    state, _, _, losses = _run(mesh, rules)
    return fx.to_host(state.params), losses


MESHES = {
    "data8": (dict(data=8, fsdp=1), "xla"),
    "fsdp8": (dict(fsdp=8), "xla"),
    "fsdp4_tensor2": (dict(fsdp=4, tensor=2), "xla"),
    "data2_fsdp2_tensor2": (dict(data=2, fsdp=2, tensor=2), "xla"),
    "fsdp4_sequence2": (dict(fsdp=4, sequence=2), "sequence_sharded"),
    # Our Pallas kernel (interpret mode) per shard, K/V gathered over the sequence axis.
    "fsdp2_tensor2_sequence2_pallas": (dict(fsdp=2, tensor=2, sequence=2), "pallas"),
    "fsdp4_tensor2_splash": (dict(fsdp=4, tensor=2), "splash"),
}


@pytest.mark.parametrize("name", list(MESHES))
def test_sharded_step_equals_single_device(name, rules, reference):
    sizes, impl = MESHES[name]
    mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(**sizes))
    state, step, batch, losses = _run(mesh, rules, impl)
    ref_params, ref_losses = reference
    np.testing.assert_allclose(losses, ref_losses, atol=TOLERANCE, rtol=0)
    # The reference moved every parameter; equality to 1e-5 is not trivially true.
    worst = jax.tree.map(
        lambda a, b: float(np.max(np.abs(np.asarray(a) - b))), state.params, ref_params
    )
    assert max(jax.tree.leaves(worst)) <= TOLERANCE, worst

    if name == "fsdp4_tensor2":
        _check_shardings(state, mesh)
    if name == "fsdp8":
        _check_per_layer_gathers(step, state, batch)


def _check_shardings(state, mesh):
    """Representative tensors carry the sharding the rules give, and so do their Adam moments."""
    expected = {
        ("layers", "mlp", "gate_proj", "kernel"): (
            P(None, ("fsdp", "sequence"), "tensor"),
            (3, 16, 64),
        ),
        ("layers", "mlp", "down_proj", "kernel"): (
            P(None, "tensor", ("fsdp", "sequence")),
            (3, 64, 16),
        ),
        ("layers", "self_attn", "q_proj", "kernel"): (
            P(None, ("fsdp", "sequence"), "tensor", None),
            (3, 16, 2, 16),
        ),
        ("layers", "self_attn", "k_proj", "bias"): (P(None, "tensor", None), (3, 1, 16)),
        ("layers", "input_layernorm", "scale"): (P(None, None), (3, 64)),
        ("embed_tokens", "embedding"): (P("tensor", ("fsdp", "sequence")), (128, 16)),
        ("lm_head", "kernel"): (P(("fsdp", "sequence"), "tensor"), (16, 128)),
    }
    adam = [
        s
        for s in jax.tree.leaves(
            state.opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState)
        )
        if isinstance(s, optax.ScaleByAdamState)
    ]
    assert len(adam) == 1
    for path, (spec, shard_shape) in expected.items():
        for tree in (state.params, adam[0].mu, adam[0].nu):
            leaf = tree
            for key in path:
                leaf = leaf[key]
            assert leaf.sharding.mesh.shape == mesh.shape
            assert leaf.sharding.spec == spec, (path, leaf.sharding.spec)
            assert leaf.addressable_shards[0].data.shape == shard_shape, path
    assert state.step.sharding.is_fully_replicated


_ALL_GATHER = re.compile(r"=\s*(\w+)\[([\d,]*)\][^=]*?\ball-gather(?:-start)?\(")


def _check_per_layer_gathers(step, state, batch):
    """In the compiled fsdp=8 program, every stacked [layers, ...] parameter is gathered only as
    one layer's slice (inside the scan's while loop), never whole."""
    hlo = step.lower(state, batch).compile().as_text()
    gathered = {tuple(int(d) for d in dims.split(",") if d) for _, dims in _ALL_GATHER.findall(hlo)}
    stacked = [np.shape(leaf) for leaf in jax.tree.leaves(state.params["layers"])]
    for shape in stacked:
        assert tuple(shape) not in gathered, f"a whole stacked parameter {shape} is all-gathered"
    per_layer = {tuple(shape[1:]) for shape in stacked if len(shape) > 2}
    assert per_layer & gathered, (per_layer, gathered)
    assert "while" in hlo
