"""Every attention implementation the model can run, by the name `Runtime.attention_impl` holds.

The table is written out here, not filled by import side effects: importing the model imports
this module, so every name below is available however the program was started. An entry builds
the function for where it runs: the mesh and rules of the traced program (None on one device)
and the query block size.
"""

from __future__ import annotations

from collections.abc import Callable

from jax.sharding import Mesh

from qwen_jax.kernels import sequence_sharded, xla
from qwen_jax.model.attention import AttentionFn
from qwen_jax.parallel.logical import LogicalRules

Builder = Callable[..., AttentionFn]

IMPLEMENTATIONS: dict[str, Builder] = {
    # Scores for the whole sequence at once; XLA partitions it over batch and heads.
    "xla": lambda *, mesh, rules, block_size: xla.xla_attention,
    # Queries sharded over the `sequence` axis (long context), in blocks.
    "sequence_sharded": lambda *, mesh, rules, block_size: sequence_sharded.sequence_sharded(
        xla.xla_attention, mesh=mesh, rules=rules, block_size=block_size
    ),
}


def check(name: str) -> None:
    if name not in IMPLEMENTATIONS:
        raise ValueError(
            f"unknown attention implementation {name!r}; known: {sorted(IMPLEMENTATIONS)}"
        )


def attention_fn(
    name: str, *, mesh: Mesh | None, rules: LogicalRules | None, block_size: int
) -> AttentionFn:
    check(name)
    return IMPLEMENTATIONS[name](mesh=mesh, rules=rules, block_size=block_size)
