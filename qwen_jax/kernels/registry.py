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

from qwen_jax.kernels import flash_tpu, sequence_sharded, splash, xla
from qwen_jax.model.attention import AttentionFn
from qwen_jax.parallel.logical import LogicalRules

Builder = Callable[..., AttentionFn]


def _pallas_blocks(mesh: Mesh | None, override: tuple[int, ...]):
    """(blocks, interpret) for the devices the program is compiled for: the mesh's, which are
    TPUs when compiling ahead of time on a CPU host, else the default backend's."""
    device = mesh.devices.flat[0] if mesh is not None else jax.devices()[0]
    if device.platform == "cpu":
        blocks, interpret = flash_tpu.INTERPRET_BLOCKS, True
    elif device.platform == "tpu":
        blocks, interpret = flash_tpu.default_blocks(device.device_kind), False
    else:
        raise ValueError(
            f"the Pallas attention kernels are written for TPU (interpret mode on CPU); there is "
            f"none for {device.platform} yet: use attention_impl='xla'"
        )
    return (flash_tpu.BlockSizes(*override) if override else blocks), interpret


def _pallas(kernel, *, mesh, rules, block_size, flash_block_sizes):
    # Mosaic kernels are not partitioned by XLA: they run per shard, K/V gathered along a
    # sharded sequence axis (positions carry each shard's query offset into the mask rule).
    blocks, interpret = _pallas_blocks(mesh, flash_block_sizes)
    fn = functools.partial(kernel, blocks=blocks, interpret=interpret)
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
    # Ours: Pallas flash attention skipping blocks by the runtime segment layout.
    "pallas": functools.partial(_pallas, flash_tpu.flash_attention),
    # JAX's splash attention, for comparison (static causal block skipping).
    "splash": functools.partial(_pallas, splash.splash_attention),
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
