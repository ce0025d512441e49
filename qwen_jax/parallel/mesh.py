"""The device mesh and the shardings of parameters, optimizer state and batches.

Five mesh axes, outermost first:
  slice     data parallelism across slices over the data-center network (DCN);
  data      pure data parallelism inside a slice (parameters replicated);
  fsdp      data parallelism with parameters and optimizer state sharded (ZeRO-3);
  tensor    Megatron tensor parallelism over heads and the MLP width;
  sequence  the token axis of activations (long context); parameters are also sharded over it,
            since its devices would otherwise hold identical copies.
Sizes come from `MeshConfig`; one may be -1 and is inferred from the device count. Which
logical name goes to which axis is the rules table (`logical_rules`, configs/mesh/rules.gin).
Every check here runs before anything is traced, so bad input fails with a message naming the
field or tensor instead of an XLA error.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from qwen_jax.parallel.logical import LogicalRules, logical_to_spec

MESH_AXES = ("slice", "data", "fsdp", "tensor", "sequence")
# The axes a batch is split over; `sequence` splits tokens, not examples.
BATCH_AXES = ("slice", "data", "fsdp")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    slice: int = 1
    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    sequence: int = 1

    def axis_sizes(self, num_devices: int) -> dict[str, int]:
        """Axis sizes with the -1 resolved; raises when they cannot multiply to `num_devices`."""
        sizes = {axis: getattr(self, axis) for axis in MESH_AXES}
        inferred = [axis for axis, size in sizes.items() if size == -1]
        bad = [f"{axis}={size}" for axis, size in sizes.items() if size == 0 or size < -1]
        if bad or len(inferred) > 1:
            raise ValueError(
                f"MeshConfig: {', '.join(bad) or inferred} invalid: sizes must be "
                f"positive, with at most one -1 (inferred)"
            )
        known = math.prod(size for size in sizes.values() if size != -1)
        if inferred:
            if num_devices % known:
                raise ValueError(
                    f"MeshConfig {sizes}: the fixed axes multiply to {known}, which "
                    f"does not divide the {num_devices} devices"
                )
            sizes[inferred[0]] = num_devices // known
        elif known != num_devices:
            raise ValueError(
                f"MeshConfig {sizes}: axis sizes multiply to {known}, but there are "
                f"{num_devices} devices"
            )
        return sizes


def logical_rules(rules: Sequence[tuple[str, Any]]) -> tuple:
    """A rules table (as gin's lists and tuples bind it) as hashable tuples."""
    return tuple(
        (name, tuple(target) if isinstance(target, list) else target) for name, target in rules
    )


def make_mesh(config: MeshConfig | None = None, devices: Sequence[Any] | None = None) -> Mesh:
    """A mesh over `devices` (default: all). On TPU the ICI axes follow the physical torus
    (mesh_utils); the `slice` axis is laid over slices, so only it crosses the DCN."""
    config = config or MeshConfig()
    devices = list(jax.devices() if devices is None else devices)
    sizes = config.axis_sizes(len(devices))
    shape = tuple(sizes[axis] for axis in MESH_AXES)
    num_slices = len({getattr(d, "slice_index", 0) for d in devices})
    if devices[0].platform != "tpu":
        grid = np.asarray(devices).reshape(shape)
    elif num_slices > 1:
        if sizes["slice"] != num_slices:
            raise ValueError(
                f"MeshConfig.slice={sizes['slice']} but the devices span {num_slices} slices"
            )
        grid = mesh_utils.create_hybrid_device_mesh(
            (1, *shape[1:]), (num_slices, 1, 1, 1, 1), devices, allow_split_physical_axes=True
        )
    else:
        grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    return Mesh(grid, MESH_AXES)


def validate_rules(rules: LogicalRules, mesh: Mesh) -> None:
    """Every mesh axis a rule names must exist in `mesh`."""
    for name, target in rules:
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        unknown = [axis for axis in axes if axis not in mesh.axis_names]
        if unknown:
            raise ValueError(
                f"sharding rule {name!r} -> {target!r} names mesh axis {unknown} "
                f"unknown to the mesh {tuple(mesh.axis_names)}"
            )


def spec_size(mesh: Mesh, spec: PartitionSpec, dim: int) -> int:
    """How many shards dimension `dim` of `spec` is split into."""
    entry = spec[dim] if dim < len(spec) else None
    axes = (entry,) if isinstance(entry, str) else tuple(entry or ())
    return math.prod(mesh.shape[axis] for axis in axes)


def named_sharding(
    mesh: Mesh, rules: LogicalRules, names: Sequence[str | None], shape: Sequence[int], what: str
) -> NamedSharding:
    """The sharding of one array of logical `names`, checking every sharded dimension divides."""
    spec = logical_to_spec(names, rules)
    for dim, (size, name) in enumerate(zip(shape, names)):
        shards = spec_size(mesh, spec, dim)
        if size % shards:
            raise ValueError(
                f"{what}: dimension {dim} ({name!r}, size {size}) is not divisible "
                f"by the {shards} shards of mesh axes {spec[dim]!r}"
            )
    return NamedSharding(mesh, spec)


def logical_names(params: nnx.State) -> dict:
    """Pure-dict tree of each parameter's logical axis names (nnx `out_sharding` metadata)."""

    def names(path, variable):
        axes = variable.get_metadata().get("out_sharding")
        if axes is None or len(axes) != len(variable.shape):
            raise ValueError(
                f"parameter {jax.tree_util.keystr(path)} has no logical axis names "
                f"matching its shape {variable.shape}: {axes}"
            )
        return tuple(axes)

    mapped = jax.tree_util.tree_map_with_path(
        names, params, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )
    return nnx.State(mapped).to_pure_dict() if isinstance(mapped, nnx.State) else mapped


def param_shardings(abstract_params: nnx.State, mesh: Mesh, rules: LogicalRules) -> dict:
    """NamedShardings (pure dict, like the params in `TrainState`) from the logical names."""
    validate_rules(rules, mesh)
    shapes = abstract_params.to_pure_dict()
    names = logical_names(abstract_params)
    return jax.tree_util.tree_map_with_path(
        lambda path, shape, axes: named_sharding(
            mesh, rules, axes, shape.shape, f"parameter {jax.tree_util.keystr(path)}"
        ),
        shapes,
        names,
        is_leaf=lambda x: isinstance(x, tuple),
    )


def check_batch(mesh: Mesh, batch_size: int, seq_len: int | None = None) -> None:
    data_shards = math.prod(mesh.shape[axis] for axis in BATCH_AXES)
    if batch_size % data_shards:
        raise ValueError(
            f"batch size {batch_size} is not divisible by the {data_shards} data "
            f"shards (mesh axes {BATCH_AXES} = "
            f"{[mesh.shape[a] for a in BATCH_AXES]})"
        )
    if seq_len is not None and seq_len % mesh.shape["sequence"]:
        raise ValueError(
            f"sequence length {seq_len} is not divisible by the sequence axis "
            f"({mesh.shape['sequence']})"
        )


def batch_sharding(
    mesh: Mesh, rules: LogicalRules, batch_size: int, seq_len: int | None = None
) -> NamedSharding:
    """Sharding of a [batch, length, ...] token array by the rules' `activation_batch` and
    `activation_length`."""
    check_batch(mesh, batch_size, seq_len)
    names = ("activation_batch",) + (("activation_length",) if seq_len is not None else ())
    return NamedSharding(mesh, logical_to_spec(names, rules))


def batch_shardings(mesh: Mesh, rules: LogicalRules, batch: Mapping[str, Any]) -> dict:
    """Shardings for a dict of [batch, length] (or [batch]) arrays or ShapeDtypeStructs."""

    def one(x):
        shape = x.shape
        return batch_sharding(mesh, rules, shape[0], shape[1] if len(shape) > 1 else None)

    return {key: one(value) for key, value in batch.items()}


def check_model_fits_mesh(config, mesh: Mesh) -> None:
    """Head counts must divide the tensor axis (else attention heads would be split)."""
    tensor = mesh.shape["tensor"]
    for field in ("num_attention_heads", "num_key_value_heads"):
        heads = getattr(config, field)
        if heads % tensor:
            raise ValueError(
                f"QwenConfig.{field}={heads} is not divisible by the tensor axis "
                f"of the mesh ({tensor})"
            )
