"""Ahead-of-time compilation of the full train step for TPU slices, with libtpu and no TPU."""

from __future__ import annotations

import sys

import gin
import pytest

import sharding_fixtures as fx
from qwen_jax import aot


def _report(preset, topology, **kwargs):
    gin.clear_config()
    try:
        gin.add_config_file_search_path(str(fx.REPO_ROOT))
        aot.parse_gin([str(fx.REPO_ROOT / "configs" / "models" / preset)], [])
        return aot.report_from_gin(topology=topology, **kwargs)
    finally:
        gin.clear_config()


@pytest.mark.parametrize(
    "preset, topology, chips",
    [
        ("qwen2_5_0_5b.gin", "v5e-8", 8),
        ("qwen2_5_7b.gin", "v5p-32", 16),
    ],
)
def test_preset_compiles_for_slice(preset, topology, chips):
    report = _report(preset, topology, seq_len=1024, global_batch=chips)
    assert report["num_devices"] == chips and report["mesh"]["fsdp"] == chips
    assert report["fits"] and 0 < report["peak_bytes_per_chip"] <= report["hbm_per_chip_bytes"]
    # fp32 master weights + Adam moments, sharded over all chips, are among the arguments.
    assert report["argument_bytes"] >= 12 * report["parameters"] / chips
    assert report["compiled_flops_per_step"] > 0 and report["model_flops_per_step"] > 0
    assert report["mosaic_kernels"] == 0  # XLA attention: no Pallas kernel


@pytest.mark.parametrize("topology", ["v5e-8", "v5p-8"])
def test_pallas_attention_compiles_inside_the_train_step(topology):
    """Our kernel's forward, dq and dk/dv, compiled by Mosaic for the generation's block table."""
    gin.clear_config()
    try:
        aot.parse_gin(
            [str(fx.REPO_ROOT / "configs" / "models" / "qwen2_5_0_5b.gin")],
            ["layers.Runtime.attention_impl = 'pallas'"],
        )
        report = aot.report_from_gin(topology=topology, seq_len=1024, global_batch=8)
    finally:
        gin.clear_config()
    assert report["fits"] and report["attention_impl"] == "pallas"
    # Forward (and its rematerialization) and the two backward kernels, in the layer scan.
    assert report["mosaic_kernels"] >= 3, report["mosaic_kernels"]


def test_topology_names():
    assert aot.libtpu_topology("v5p-256") == "v5p:4x4x8"
    assert aot.libtpu_topology("v5e-8") == "v5e:2x4"
    assert aot.libtpu_topology("v5litepod-16") == "v5e:4x4"
    assert aot.libtpu_topology("v4-32") == "v4:2x2x4"
    assert aot.libtpu_topology("v6e-64") == "v6e:8x8"
    with pytest.raises(ValueError, match="not a standard slice"):
        aot.libtpu_topology("v5p-24")
    with pytest.raises(ValueError, match="expected <generation>-<size>"):
        aot.libtpu_topology("h100-8")


def test_missing_libtpu_fails_clearly(monkeypatch):
    monkeypatch.setitem(sys.modules, "libtpu", None)  # makes `import libtpu` raise ImportError
    with pytest.raises(SystemExit, match="needs libtpu"):
        aot.topology_devices("v5e-8")


def test_multislice_mesh_puts_slices_on_the_slice_axis():
    from qwen_jax.parallel import mesh as mesh_lib

    devices = aot.topology_devices("v5e-8", num_slices=2)
    mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(slice=2), devices)
    assert dict(mesh.shape) == {"slice": 2, "data": 1, "fsdp": 8, "tensor": 1, "sequence": 1}
    for index in range(2):
        assert {d.slice_index for d in mesh.devices[index].flat} == {index}
    with pytest.raises(ValueError, match="slice=1 but the devices span 2 slices"):
        mesh_lib.make_mesh(mesh_lib.MeshConfig(slice=1), devices)
