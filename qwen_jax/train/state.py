"""The training state, created already sharded: it never exists whole on one device.

`create_train_state` traces the model constructor abstractly (`nnx.eval_shape`), derives every
sharding from the parameters' logical names and the rules, then runs the real initializer under
`jax.jit` with those output shardings, so each device computes only its own shards.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from qwen_jax.model.transformer import abstract_module
from qwen_jax.parallel import mesh as mesh_lib
from qwen_jax.parallel.logical import LogicalRules


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    step: jax.Array  # int32 scalar: optimizer updates applied so far
    params: Any  # pure dict of trained parameters (fp32 master weights by default)
    opt_state: optax.OptState
    skipped: jax.Array  # int32 scalar: steps whose update was dropped for non-finite values
    frozen: Any = None  # untrained parameters, e.g. the DPO reference model

    def replace(self, **changes) -> "TrainState":
        return dataclasses.replace(self, **changes)


def state_shardings(
    param_shardings: Any,
    optimizer: optax.GradientTransformation,
    abstract_params: Any,
    mesh: Mesh,
    with_frozen: bool = False,
) -> TrainState:
    """Shardings of a TrainState: optimizer moments follow their parameter; scalars replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    opt_shapes = jax.eval_shape(optimizer.init, abstract_params)
    opt_shardings = optax.tree_map_params(
        optimizer,
        lambda _, sharding: sharding,
        opt_shapes,
        param_shardings,
        transform_non_params=lambda _: replicated,
    )
    return TrainState(
        step=replicated,
        params=param_shardings,
        opt_state=opt_shardings,
        skipped=replicated,
        frozen=param_shardings if with_frozen else None,
    )


def _prepare(model_factory, optimizer, mesh, rules, with_frozen):
    graphdef, abstract_params, model = abstract_module(model_factory)
    config = getattr(model, "config", None)
    if config is not None:
        mesh_lib.check_model_fits_mesh(config, mesh)
    param_shardings = mesh_lib.param_shardings(abstract_params, mesh, rules)
    shardings = state_shardings(
        param_shardings, optimizer, abstract_params.to_pure_dict(), mesh, with_frozen
    )

    def init() -> TrainState:
        _, params = nnx.split(model_factory(), nnx.Param)
        params = params.to_pure_dict()
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=optimizer.init(params),
            skipped=jnp.zeros((), jnp.int32),
            frozen=params if with_frozen else None,
        )

    return graphdef, shardings, init


def create_train_state(
    model_factory: Callable[[], nnx.Module],
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    rules: LogicalRules,
    *,
    with_frozen: bool = False,
    abstract: bool = False,
):
    """(state, graphdef, shardings). `model_factory()` builds the model with its own rngs;
    `with_frozen` keeps a copy of the initial parameters as `frozen` (e.g. the DPO reference,
    before a checkpoint is restored over both). `abstract`: the state as ShapeDtypeStructs
    carrying their shardings, nothing allocated (what ahead-of-time compilation needs)."""
    graphdef, shardings, init = _prepare(model_factory, optimizer, mesh, rules, with_frozen)
    if not abstract:
        return jax.jit(init, out_shardings=shardings)(), graphdef, shardings
    state = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        jax.eval_shape(init),
        shardings,
    )
    return state, graphdef, shardings
