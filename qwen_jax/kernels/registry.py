"""Every attention implementation the model can run, by the name `Runtime.attention_impl` holds.

The table is written out here, not filled by import side effects: importing the model imports
this module, so every name below is available however the program was started. An entry builds
the function for where it runs: the mesh and rules of the traced program (None on one device),
the query block size of `sequence_sharded`, and the Pallas kernels' block sizes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
from jax.sharding import Mesh

from qwen_jax.kernels import cudnn, flash_gpu, flash_tpu, sequence_sharded, splash, xla
from qwen_jax.model.attention import AttentionFn
from qwen_jax.parallel.logical import LogicalRules

Builder = Callable[..., AttentionFn]


def _device(mesh: Mesh | None):
    """A device the program runs on: the mesh's, which are TPUs when compiling ahead of time on
    a CPU host, else the default backend's."""
    return mesh.devices.flat[0] if mesh is not None else jax.devices()[0]


def _tpu_blocks(device, override: tuple[int, ...]):
    """(blocks, interpret) for the TPU kernels (interpret mode on CPU)."""
    platform = device.platform
    if platform == "cpu":
        blocks, interpret = flash_tpu.INTERPRET_BLOCKS, True
    elif platform == "tpu":
        blocks, interpret = flash_tpu.default_blocks(device.device_kind), False
    else:
        raise ValueError(
            f"this attention kernel is written for TPU (interpret mode on CPU); there is none "
            f"for {platform}: use attention_impl='pallas', 'cudnn' or 'xla'"
        )
    return (flash_tpu.BlockSizes(*override) if override else blocks), interpret


def _gpu_blocks(override: tuple[int, ...]) -> flash_gpu.BlockSizes:
    return flash_gpu.BlockSizes(*override) if override else flash_gpu.DEFAULT_BLOCKS


def _pallas(*, mesh, rules, block_size, flash_block_sizes):
    # Pallas kernels are not partitioned by XLA: they run per shard, K/V gathered along a
    # sharded sequence axis (positions carry each shard's query offset into the mask rule).
    device = _device(mesh)
    if device.platform == "gpu":
        fn = functools.partial(
            flash_gpu.flash_attention, blocks=_gpu_blocks(flash_block_sizes), interpret=False
        )
    else:
        blocks, interpret = _tpu_blocks(device, flash_block_sizes)
        fn = functools.partial(flash_tpu.flash_attention, blocks=blocks, interpret=interpret)
    return sequence_sharded.shard_mapped(fn, mesh, rules)


def _splash(*, mesh, rules, block_size, flash_block_sizes):
    blocks, interpret = _tpu_blocks(_device(mesh), flash_block_sizes)
    fn = functools.partial(splash.splash_attention, blocks=blocks, interpret=interpret)
    return sequence_sharded.shard_mapped(fn, mesh, rules)


def _cudnn(*, mesh, rules, block_size, flash_block_sizes):
    platform = _device(mesh).platform
    if platform != "gpu":
        raise ValueError(
            f"attention_impl='cudnn' runs on NVIDIA GPUs, not {platform}: use 'pallas' or 'xla'"
        )
    fn = functools.partial(cudnn.cudnn_attention, fallback_blocks=_gpu_blocks(flash_block_sizes))
    return sequence_sharded.shard_mapped(fn, mesh, rules)


IMPLEMENTATIONS: dict[str, Builder] = {
    # Scores for the whole sequence at once; XLA partitions it over batch and heads.
    "xla": lambda *, mesh, rules, block_size, flash_block_sizes: xla.xla_attention,
    # Queries sharded over the `sequence` axis (long context), in blocks.
    "sequence_sharded": lambda *, mesh, rules, block_size, flash_block_sizes: (
        sequence_sharded.sequence_sharded(
            xla.xla_attention, mesh=mesh, rules=rules, block_size=block_size
        )
    ),
    # Ours: Pallas flash attention skipping blocks by the runtime segment layout (Mosaic on TPU,
    # Triton on NVIDIA GPUs).
    "pallas": _pallas,
    # JAX's splash attention (TPU), for comparison (static causal block skipping).
    "splash": _splash,
    # cuDNN's fused attention (NVIDIA GPUs), the GPU baseline; layouts it cannot express run on
    # the Pallas kernel.
    "cudnn": _cudnn,
}


def check(name: str) -> None:
    if name not in IMPLEMENTATIONS:
        raise ValueError(
            f"unknown attention implementation {name!r}; known: {sorted(IMPLEMENTATIONS)}"
        )


def attention_fn(
    name: str,
    *,
    mesh: Mesh | None,
    rules: LogicalRules | None,
    block_size: int,
    flash_block_sizes: tuple[int, ...] = (),
) -> AttentionFn:
    check(name)
    return IMPLEMENTATIONS[name](
        mesh=mesh, rules=rules, block_size=block_size, flash_block_sizes=flash_block_sizes
    )
