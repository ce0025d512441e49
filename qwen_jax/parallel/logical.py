"""Logical axis names to mesh axes: the one place where model names meet mesh names.

The model annotates parameters and activations with logical names ("embed", "mlp",
"activation_batch", ...). A rules table, set in gin, maps each logical name to a mesh axis, a tuple
of mesh axes, or None (replicated). Every logical name must appear in the table: there is no
catch-all, so a new parameter can never be replicated silently.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

LogicalRules = Sequence[tuple[str, str | tuple[str, ...] | None]]

_ACTIVE = threading.local()


def logical_to_spec(names: Sequence[str | None], rules: LogicalRules) -> PartitionSpec:
    """PartitionSpec for logical `names`; a mesh axis is used at most once per array."""
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name in names:
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise ValueError(
                f"logical axis {name!r} has no entry in the sharding rules "
                f"(known: {sorted(table)}); add it to the rules table in gin"
            )
        target = table[name]
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        # An axis already used by an earlier dimension leaves this one unsharded on it.
        axes = tuple(a for a in axes if a not in used)
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else (axes or None))
    return PartitionSpec(*spec)


@contextlib.contextmanager
def activate(mesh: Mesh, rules: LogicalRules) -> Iterator[None]:
    """Makes `constrain` apply sharding constraints for `mesh` and `rules` while tracing."""
    previous = getattr(_ACTIVE, "value", None)
    _ACTIVE.value = (mesh, tuple(rules))
    try:
        yield
    finally:
        _ACTIVE.value = previous


def active() -> tuple[Mesh, LogicalRules] | None:
    return getattr(_ACTIVE, "value", None)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Sharding constraint by logical names; a no-op outside `activate` (single device, tests)."""
    context = active()
    if context is None:
        return x
    mesh, rules = context
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(names, rules)))
