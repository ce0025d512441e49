"""Ahead-of-time compilation of the full train step for a TPU slice, without a TPU.

  python -m qwen_jax.aot --gin_file=configs/models/qwen2_5_72b.gin --topology=v5p-256 \
      --seq_len=4096 --global_batch=256 [--gin_file=configs/mesh/fsdp_tensor.gin] [--gin_param=...]

libtpu describes the slice (`jax.experimental.topologies`), the step (forward, backward, AdamW) is
lowered with abstract inputs and compiled by the real TPU compiler, and one JSON object goes to
stdout: memory per chip from `compiled.memory_analysis()`, the step's matmul FLOPs
(`train/flops.py`), and whether it fits in HBM. Topology names follow Cloud TPU: v4-N and v5p-N
count TensorCores (two per chip), v5e-N (alias v5litepod-N) and v6e-N count chips; a raw libtpu
name such as "v5p:4x4x8" works too.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
from absl import app, flags
from flax import nnx

from qwen_jax import cli
from qwen_jax.model.config import QwenConfig, model_flops_per_token, parameter_count
from qwen_jax.model.layers import Runtime
from qwen_jax.model.transformer import Qwen2ForCausalLM
from qwen_jax.parallel import mesh as mesh_lib
from qwen_jax.train import flops as flops_lib
from qwen_jax.train import optimizer as optimizer_lib
from qwen_jax.train import state as state_lib
from qwen_jax.train import step as step_lib

_TOPOLOGY = flags.DEFINE_string("topology", None, "slice, e.g. v5e-8, v5p-256, v4-32, v6e-64")
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "slices joined over DCN (mesh axis `slice`)")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 4096, "tokens per example")
_GLOBAL_BATCH = flags.DEFINE_integer("global_batch", None, "examples per step (all devices)")
_MICROBATCHES = flags.DEFINE_integer("microbatches", 1, "gradient-accumulation microbatches")

# Per-chip HBM (bytes) by libtpu device_kind; public Cloud TPU figures.
HBM_BYTES = {
    "TPU v4": 32 * 2**30,
    "TPU v5 lite": 16 * 2**30,
    "TPU v5": 95 * 10**9,
    "TPU v6 lite": 32 * 2**30,
}
# Generation -> (libtpu prefix, TensorCores per chip in the public name, standard chip grids).
_CUBE = {
    4: "2x2x1",
    8: "2x2x2",
    16: "2x2x4",
    32: "2x4x4",
    64: "4x4x4",
    128: "4x4x8",
    256: "4x8x8",
    512: "8x8x8",
    1024: "8x8x16",
    2048: "8x16x16",
    4096: "16x16x16",
}
_PLANE = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
GENERATIONS = {
    "v4": ("v4", 2, _CUBE),
    "v5p": ("v5p", 2, _CUBE),
    "v5e": ("v5e", 1, _PLANE),
    "v5litepod": ("v5e", 1, _PLANE),
    "v6e": ("v6e", 1, _PLANE),
}


def standard_slices(generation: str) -> list[str]:
    prefix, per_chip, grids = GENERATIONS[generation]
    return [f"{generation}-{chips * per_chip}" for chips in sorted(grids)]


def libtpu_topology(name: str) -> str:
    """'v5p-256' -> 'v5p:4x4x8'; raw libtpu names pass through."""
    if ":" in name:
        return name
    generation, _, count = name.partition("-")
    if generation not in GENERATIONS or not count.isdigit():
        raise ValueError(
            f"--topology={name!r}: expected <generation>-<size> with generation in "
            f"{sorted(GENERATIONS)} (e.g. v5p-256), or a libtpu name like v5p:4x4x8"
        )
    prefix, per_chip, grids = GENERATIONS[generation]
    chips = int(count) // per_chip
    if int(count) % per_chip or chips not in grids:
        raise ValueError(
            f"--topology={name!r}: not a standard slice; choose one of "
            f"{standard_slices(generation)}"
        )
    return f"{prefix}:{grids[chips]}"


def topology_devices(name: str, num_slices: int = 1) -> list:
    try:
        import libtpu  # noqa: F401  (the TPU compiler; `pip install .[tpu]`)
    except ImportError as error:
        raise SystemExit(
            "qwen_jax.aot needs libtpu to compile for TPU without a TPU: "
            "pip install 'qwen_jax[tpu]' (or pip install libtpu)"
        ) from error
    from jax.experimental import topologies

    # Compile-only use touches no TPU, so several compiling processes may share the host
    # (otherwise the second one fails on libtpu's lockfile).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    kwargs = {"num_slices": num_slices} if num_slices > 1 else {}
    if name.startswith("v4"):
        kwargs["chip_config_name"] = "megacore"
    return list(topologies.get_topology_desc(libtpu_topology(name), "tpu", **kwargs).devices)


def compile_report(
    *,
    topology: str,
    seq_len: int,
    global_batch: int,
    num_slices: int = 1,
    microbatches: int = 1,
    config: QwenConfig,
    runtime: Runtime,
    mesh_config: mesh_lib.MeshConfig,
    rules,
) -> dict[str, Any]:
    """Compiles the train step for `topology` and returns the report."""
    devices = topology_devices(topology, num_slices)
    mesh = mesh_lib.make_mesh(mesh_config, devices)
    mesh_lib.check_model_fits_mesh(config, mesh)
    mesh_lib.check_batch(mesh, global_batch, seq_len)
    optimizer, schedule = optimizer_lib.make_optimizer(optimizer_lib.constant(1e-4))

    state, graphdef, shardings = state_lib.create_train_state(
        lambda: Qwen2ForCausalLM(config, runtime, rngs=nnx.Rngs(0)),
        optimizer,
        mesh,
        rules,
        abstract=True,
    )
    batch_sharding = mesh_lib.batch_sharding(mesh, rules, global_batch, seq_len)
    batch = {
        name: jax.ShapeDtypeStruct((global_batch, seq_len), dtype, sharding=batch_sharding)
        for name, dtype in (
            ("inputs", jnp.int32),
            ("targets", jnp.int32),
            ("loss_mask", jnp.float32),
            ("segment_ids", jnp.int32),
            ("positions", jnp.int32),
        )
    }
    step = step_lib.make_train_step(
        graphdef,
        step_lib.lm_loss_fn,
        optimizer,
        mesh=mesh,
        rules=rules,
        state_shardings=shardings,
        batch_shardings={k: batch_sharding for k in batch},
        schedule=schedule,
        microbatches=microbatches,
    )
    start = time.perf_counter()
    lowered = step.lower(state, batch)
    lower_seconds = time.perf_counter() - start
    hbm = HBM_BYTES[devices[0].device_kind]
    model_flops = model_flops_per_token(config, seq_len) * global_batch * seq_len
    compiled_flops = flops_lib.step_flops(step, state, batch)
    summary = {
        "topology": topology,
        "num_slices": num_slices,
        "device_kind": devices[0].device_kind,
        "num_devices": len(devices),
        "mesh": dict(mesh.shape),
        "parameters": parameter_count(config),
        "seq_len": seq_len,
        "global_batch": global_batch,
        "microbatches": microbatches,
        "tokens_per_step": global_batch * seq_len,
        "remat_policy": runtime.remat_policy,
        "attention_impl": runtime.attention_impl,
        "compute_dtype": runtime.dtype,
        "param_dtype": runtime.param_dtype,
        "hbm_per_chip_bytes": hbm,
        "model_flops_per_step": model_flops,
        "compiled_flops_per_step": compiled_flops,
        "compiled_over_model_flops": compiled_flops / model_flops,
        "compiled_flops_note": "matmul FLOPs of the traced step, each scan body times its "
        "length, rematerialized forwards included; attention inside our Pallas kernels is not "
        "counted, and XLA's cost_analysis is not used because it counts each loop body once",
    }
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as error:
        # The TPU compiler refuses a program that cannot fit: that is an answer, not a failure.
        if "RESOURCE_EXHAUSTED" not in str(error):
            raise
        needed = re.search(r"temporaries \(([\d.]+)G\)", str(error))
        return {
            **summary,
            "fits": False,
            "temp_bytes": int(float(needed.group(1)) * 2**30) if needed else None,
            "compile_error": str(error).splitlines()[0][:300],
        }
    compile_seconds = time.perf_counter() - start - lower_seconds

    memory = compiled.memory_analysis()
    peak = (
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        + memory.temp_size_in_bytes
        - memory.alias_size_in_bytes
    )
    return {
        **summary,
        "peak_bytes_per_chip": int(peak),
        "argument_bytes": int(memory.argument_size_in_bytes),
        "output_bytes": int(memory.output_size_in_bytes),
        "temp_bytes": int(memory.temp_size_in_bytes),
        "alias_bytes": int(memory.alias_size_in_bytes),
        "fits": bool(peak <= hbm),
        # Pallas kernels (ours, splash) in the step, which Mosaic compiled with it. Counted in the
        # lowered program: the compiled one's text fails to print on v5p (an XLA RET_CHECK).
        "mosaic_kernels": lowered.as_text().count("@tpu_custom_call"),
        "lower_seconds": round(lower_seconds, 1),
        "compile_seconds": round(compile_seconds, 1),
    }


# A training run's defaults, which the user's files and bindings override: bf16 compute over fp32
# master weights, full rematerialization, the shipped rules table.
DEFAULTS = (
    "layers.Runtime.dtype = 'bfloat16'",
    "layers.Runtime.remat_policy = 'full'",
    "include 'configs/mesh/rules.gin'",
)


def parse_gin(files, params, defaults=()) -> None:
    cli.parse_gin(files, params, defaults=[*DEFAULTS, *defaults])


def report_from_gin(**kwargs) -> dict[str, Any]:
    """`compile_report` for the model, runtime, mesh and rules the parsed gin files bind (the
    mesh's `slice` axis defaults to `num_slices`)."""
    from qwen_jax import configurables

    num_slices = kwargs.get("num_slices", 1)
    return compile_report(
        config=configurables.QwenConfig(),
        runtime=configurables.Runtime(),
        mesh_config=configurables.MeshConfig(slice=num_slices),
        rules=configurables.logical_rules(),
        **kwargs,
    )


def main() -> None:
    if not _TOPOLOGY.value or not _GLOBAL_BATCH.value:
        raise app.UsageError("--topology and --global_batch are required")
    parse_gin(cli.GIN_FILE.value, cli.GIN_PARAM.value)
    report = report_from_gin(
        topology=_TOPOLOGY.value,
        seq_len=_SEQ_LEN.value,
        global_batch=_GLOBAL_BATCH.value,
        num_slices=_NUM_SLICES.value,
        microbatches=_MICROBATCHES.value,
    )
    print(json.dumps(report))


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(cli.run(main, argv)))
