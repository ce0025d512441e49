"""Matmul FLOPs of a traced program, with every loop body counted as many times as it runs.

XLA's `cost_analysis` counts a while-loop body once, so for a step whose layers run in a
`lax.scan` it reports little more than one layer. Counting on the jaxpr instead sees each scan's
length, and the rematerialized forward passes that `jax.checkpoint` puts into the backward pass,
so (this count) / (model FLOPs) shows what a remat policy costs.

Counted: `dot_general` (2 · output size · contracted size) and Pallas calls that carry a cost
estimate (splash attention does; ours carry none, so attention inside them is not counted).
Elementwise work is not counted: it is a small share of a transformer's FLOPs.
"""

from __future__ import annotations

import math

import jax
from jax.extend import core as jex_core


def _dot_flops(eqn) -> float:
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval
    contracted = math.prod(lhs.shape[d] for d in lhs_contract)
    return 2.0 * math.prod(eqn.outvars[0].aval.shape) * contracted


def _sub_jaxprs(value):
    if isinstance(value, jex_core.ClosedJaxpr):
        yield value.jaxpr
    elif isinstance(value, jex_core.Jaxpr):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _sub_jaxprs(item)


def jaxpr_flops(jaxpr) -> float:
    """Matmul FLOPs of `jaxpr` (a Jaxpr or ClosedJaxpr), loop bodies times their trip counts."""
    if isinstance(jaxpr, jex_core.ClosedJaxpr):
        jaxpr = jaxpr.jaxpr
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total += _dot_flops(eqn)
            continue
        if name == "pallas_call":
            estimate = eqn.params.get("cost_estimate")
            total += float(estimate.flops) if estimate is not None else 0.0
            continue
        counts = [jaxpr_flops(sub) for value in eqn.params.values() for sub in _sub_jaxprs(value)]
        inner = sum(counts)
        if name == "cond":
            # One branch runs: count the dearest.
            inner = max(counts, default=0.0)
        elif name == "scan":
            inner *= eqn.params["length"]
        elif name == "while":
            raise ValueError("a while loop has no static trip count; count a scan instead")
        elif name == "shard_map":
            # The body sees one device's shard: every device in the manual axes runs it.
            mesh = eqn.params["mesh"]
            manual = eqn.params["newly_manual_axes"]
            inner *= math.prod(mesh.shape[axis] for axis in manual)
        total += inner
    return total


def step_flops(fn, *args) -> float:
    """Matmul FLOPs of one call of `fn(*args)` (arrays or jax.ShapeDtypeStruct)."""
    return jaxpr_flops(jax.make_jaxpr(fn)(*args))
