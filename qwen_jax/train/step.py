"""The jitted training step: forward, backward, accumulation, clipping, AdamW, NaN guard.

Contract for a loss function `loss_fn(model, batch, frozen) -> (loss_sum, aux)`: `loss_sum` is a
SUM over the examples or tokens of the (micro)batch and `aux["weight"]` is what it is normalized
by (loss tokens for LM, pairs for DPO). The step divides the total over all microbatches by the
total weight, so k microbatches of accumulation equal one batch of k times the size exactly, and
the mean is over the global batch however it is split across devices. Other `aux` entries are
summed over microbatches and reported as they are.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from qwen_jax.parallel import logical
from qwen_jax.parallel import mesh as mesh_lib
from qwen_jax.train.loss import chunked_cross_entropy
from qwen_jax.train.state import TrainState

NAN_POLICIES = ("skip", "stop")


def lm_loss_fn(
    model,
    batch: Mapping[str, jax.Array],
    frozen: Any = None,
    *,
    chunk_size: int = 1024,
    z_loss: float = 0.0,
):
    """Next-token loss for pre-training and SFT batches: `inputs`, `targets`, `loss_mask`,
    `segment_ids`, `positions`, all [batch, length]."""
    del frozen
    hidden, _ = model.hidden_states(batch["inputs"], batch["positions"], batch["segment_ids"])
    loss_sum, weight, aux = chunked_cross_entropy(
        hidden,
        model.output_kernel(),
        batch["targets"],
        batch["loss_mask"],
        chunk_size=chunk_size,
        z_loss=z_loss,
    )
    tokens = jnp.sum((batch["segment_ids"] != 0).astype(jnp.float32))
    return loss_sum, {"weight": weight, "tokens": tokens, **aux}


def _split_microbatches(batch, microbatches: int, data_shards: int):
    """[B, ...] -> [k, B/k, ...], microbatch j = examples j, j+k, ...: each device's examples stay
    on that device (a contiguous split would move data between devices)."""

    def split(x):
        b = x.shape[0]
        if b % microbatches or (b // microbatches) % data_shards:
            raise ValueError(
                f"batch size {b} does not split into {microbatches} microbatches "
                f"each divisible by the {data_shards} data shards"
            )
        return jnp.moveaxis(x.reshape(b // microbatches, microbatches, *x.shape[1:]), 1, 0)

    return jax.tree.map(split, batch)


def make_train_step(
    graphdef: nnx.GraphDef,
    loss_fn: Callable,
    optimizer: optax.GradientTransformation,
    *,
    mesh: Mesh,
    rules: logical.LogicalRules,
    state_shardings: TrainState,
    batch_shardings: Any,
    schedule: optax.Schedule | None = None,
    microbatches: int = 1,
    nan_policy: str = "skip",
):
    """`train_step(state, batch) -> (state, metrics)`, jitted with explicit shardings; the state
    argument is donated.

    Non-finite loss or gradients: the update is not applied (parameters and optimizer state are
    returned unchanged) and `metrics["nonfinite"]` is set. With 'skip' the `skipped` counter
    increments and training goes on; with 'stop' the state is returned untouched and the trainer
    is expected to stop. `state.step` counts applied updates only, so the learning-rate schedule
    never advances on a dropped step.
    """
    if nan_policy not in NAN_POLICIES:
        raise ValueError(f"nan_policy={nan_policy!r}; choose one of {NAN_POLICIES}")
    if microbatches < 1:
        raise ValueError(f"microbatches={microbatches} must be >= 1")
    mesh_lib.validate_rules(rules, mesh)
    data_shards = math.prod(mesh.shape[axis] for axis in mesh_lib.BATCH_AXES)
    replicated = NamedSharding(mesh, PartitionSpec())

    def grads_and_metrics(params, batch, frozen):
        def objective(p):
            return loss_fn(nnx.merge(graphdef, p), batch, frozen)

        (loss_sum, aux), grads = jax.value_and_grad(objective, has_aux=True)(params)
        return loss_sum, aux, grads

    def accumulate(params, batch, frozen):
        if microbatches == 1:
            return grads_and_metrics(params, batch, frozen)
        micro = _split_microbatches(batch, microbatches, data_shards)

        def body(carry, one):
            loss_sum, aux, grads = grads_and_metrics(params, one, frozen)
            return jax.tree.map(jnp.add, carry, (loss_sum, aux, grads)), None

        first = jax.tree.map(lambda x: x[0], micro)
        zeros = jax.tree.map(
            lambda s: jnp.zeros(s.shape, s.dtype),
            jax.eval_shape(grads_and_metrics, params, first, frozen),
        )
        total, _ = jax.lax.scan(body, zeros, micro)
        return total

    def step(state: TrainState, batch):
        with logical.activate(mesh, rules):
            loss_sum, aux, grads = accumulate(state.params, batch, state.frozen)
        weight = aux["weight"]
        scale = jnp.where(weight > 0, 1.0 / jnp.maximum(weight, 1e-30), 0.0)
        loss = loss_sum * scale
        grads = jax.tree.map(lambda g: g * scale.astype(g.dtype), grads)
        grad_norm = optax.global_norm(grads)
        nonfinite = ~(jnp.isfinite(loss) & jnp.isfinite(grad_norm))

        updates, new_opt_state = optimizer.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)

        def keep(new, old):
            return jax.tree.map(lambda n, o: jnp.where(nonfinite, o, n), new, old)

        skipped_inc = nonfinite.astype(jnp.int32) if nan_policy == "skip" else 0
        new_state = state.replace(
            step=state.step + (1 - nonfinite.astype(jnp.int32)),
            params=keep(new_params, state.params),
            opt_state=keep(new_opt_state, state.opt_state),
            skipped=state.skipped + skipped_inc,
        )
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "nonfinite": nonfinite,
            "skipped": new_state.skipped,
            **{k: v for k, v in aux.items()},
        }
        if schedule is not None:
            metrics["learning_rate"] = jnp.asarray(schedule(state.step), jnp.float32)
        return new_state, metrics

    return jax.jit(
        step,
        in_shardings=(state_shardings, batch_shardings),
        out_shardings=(state_shardings, replicated),
        donate_argnums=0,
    )
