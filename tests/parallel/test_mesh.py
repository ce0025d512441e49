"""Mesh construction, the gin presets, and clear errors for bad input before any compilation."""

from __future__ import annotations

import gin
import jax
import numpy as np
import pytest

import sharding_fixtures as fx
from qwen_jax import configurables
from qwen_jax.model.config import QwenConfig
from qwen_jax.parallel import mesh as mesh_lib
from qwen_jax.train import state as state_lib

MESH_GINS = sorted((fx.REPO_ROOT / "configs" / "mesh").glob("*.gin"))


@pytest.mark.parametrize("path", MESH_GINS, ids=lambda p: p.name)
def test_every_mesh_gin_parses_and_builds_a_mesh(path):
    gin.clear_config()
    try:
        gin.add_config_file_search_path(str(fx.REPO_ROOT))
        gin.parse_config_file(str(path))
        mesh, rules = configurables.mesh_and_rules()
        mesh_lib.validate_rules(rules, mesh)
    finally:
        gin.clear_config()
    assert mesh.devices.size == len(jax.devices()) == 8
    assert tuple(mesh.axis_names) == mesh_lib.MESH_AXES


def test_inferred_axis():
    assert mesh_lib.MeshConfig(data=2, fsdp=-1, tensor=2).axis_sizes(8)["fsdp"] == 2


@pytest.mark.parametrize(
    "sizes, message",
    [
        (dict(data=3, fsdp=1), "multiply to 3, but there are 8 devices"),
        (dict(data=3, fsdp=-1), "does not divide the 8 devices"),
        (dict(data=-1, fsdp=-1), "at most one -1"),
        (dict(tensor=0), "tensor=0"),
    ],
)
def test_axis_sizes_not_matching_devices(sizes, message):
    with pytest.raises(ValueError, match=message):
        mesh_lib.make_mesh(mesh_lib.MeshConfig(**sizes))


def test_rule_naming_unknown_axis():
    rules = [*fx.rules_from_gin(), ("mlp", "model")]
    rules = [r for r in rules if r != ("mlp", "tensor")]
    mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(fsdp=8))
    opt, _ = fx.optimizer()
    with pytest.raises(ValueError, match=r"'mlp' -> 'model' names mesh axis \['model'\]"):
        state_lib.create_train_state(fx.factory(), opt, mesh, rules)


def test_logical_name_missing_from_rules():
    rules = [r for r in fx.rules_from_gin() if r[0] != "mlp"]
    mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(fsdp=8))
    opt, _ = fx.optimizer()
    with pytest.raises(ValueError, match="'mlp' has no entry in the sharding rules"):
        state_lib.create_train_state(fx.factory(), opt, mesh, rules)


def test_heads_not_divisible_by_tensor_axis():
    mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(fsdp=2, tensor=4))
    opt, _ = fx.optimizer()
    with pytest.raises(ValueError, match="num_key_value_heads=2 is not divisible by the tensor"):
        state_lib.create_train_state(fx.factory(), opt, mesh, fx.rules_from_gin())


def test_parameter_not_divisible_names_the_tensor():
    config = QwenConfig(
        hidden_size=64,
        intermediate_size=99,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
    )
    mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(fsdp=4, tensor=2))
    opt, _ = fx.optimizer()
    with pytest.raises(
        ValueError,
        match=r"\['layers'\]\['mlp'\]\['down_proj'\]\['kernel'\]: "
        r"dimension 1 \('mlp', size 99\)",
    ):
        state_lib.create_train_state(fx.factory(config), opt, mesh, fx.rules_from_gin())


def test_batch_not_divisible_by_data_axes():
    mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(data=2, fsdp=4))
    rules = fx.rules_from_gin()
    batch = {"inputs": np.zeros((12, 16), np.int32)}
    with pytest.raises(ValueError, match="batch size 12 is not divisible by the 8 data shards"):
        mesh_lib.batch_shardings(mesh, rules, batch)
    seq_mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(fsdp=2, sequence=4))
    with pytest.raises(ValueError, match="sequence length 10 is not divisible"):
        mesh_lib.batch_shardings(seq_mesh, rules, {"inputs": np.zeros((8, 10), np.int32)})
