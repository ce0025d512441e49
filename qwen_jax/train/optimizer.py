"""AdamW with global-norm clipping and the learning-rate schedules (gin picks and binds them).

Parameters are kept in `Runtime.param_dtype` (float32 master weights by default) whatever the
compute dtype, so the update is always applied in full precision. Weight decay skips norms and
biases (every parameter with fewer than two dimensions once the stacked "layers" axis is
discounted), as in the Qwen and Llama recipes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def warmup_cosine(
    *,
    peak_lr: float,
    total_steps: int,
    warmup_steps: int = 0,
    final_lr_fraction: float = 0.1,
) -> optax.Schedule:
    """Linear warmup from 0 to `peak_lr`, then cosine decay to `final_lr_fraction * peak_lr`."""
    if total_steps <= warmup_steps:
        raise ValueError(
            f"warmup_cosine: total_steps={total_steps} must exceed warmup_steps={warmup_steps}"
        )
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=peak_lr,
        warmup_steps=warmup_steps,
        decay_steps=total_steps,
        end_value=peak_lr * final_lr_fraction,
    )


def warmup_stable_decay(
    *,
    peak_lr: float,
    stable_steps: int,
    warmup_steps: int = 0,
    decay_steps: int = 0,
    floor_lr: float = 0.0,
    decay_shape: str = "linear",
    step_offset: int = 0,
) -> optax.Schedule:
    """Warmup-stable-decay (WSD): linear warmup, a constant plateau, then a decay to `floor_lr`
    that stays there. `step_offset` lets a stage of staged pre-training own a window of one global
    schedule: the schedule is evaluated at `step + step_offset`."""
    if decay_shape not in ("linear", "cosine", "sqrt"):
        raise ValueError(
            f"warmup_stable_decay.decay_shape={decay_shape!r}: choose linear, cosine or sqrt"
        )
    if min(warmup_steps, stable_steps, decay_steps) < 0:
        raise ValueError("warmup_stable_decay: step counts must be >= 0")

    def schedule(step):
        step = jnp.asarray(step, jnp.float32) + step_offset
        warm = peak_lr * step / max(warmup_steps, 1)
        progress = jnp.clip((step - warmup_steps - stable_steps) / max(decay_steps, 1), 0.0, 1.0)
        if decay_shape == "linear":
            fraction = 1.0 - progress
        elif decay_shape == "cosine":
            fraction = 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        else:
            fraction = 1.0 - jnp.sqrt(progress)
        decayed = floor_lr + (peak_lr - floor_lr) * fraction
        return jnp.where(step < warmup_steps, warm, decayed)

    return schedule


def constant(lr: float) -> optax.Schedule:
    return optax.constant_schedule(lr)


def decay_mask(params):
    """True for matrices (decayed), False for norms and biases."""

    def decays(path, leaf):
        names = [str(getattr(key, "key", key)) for key in path]
        stacked = "layers" in names
        return leaf.ndim - (1 if stacked else 0) >= 2 and names[-1] != "bias"

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(
    schedule: optax.Schedule,
    b1: float = 0.9,
    b2: float = 0.95,
    eps: float = 1e-8,
    weight_decay: float = 0.1,
    clip_norm: float | None = 1.0,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(optimizer, schedule). The schedule is returned too so that the step can report the
    learning rate at `state.step`."""
    parts = []
    if clip_norm is not None:
        parts.append(optax.clip_by_global_norm(clip_norm))
    parts.append(
        optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask)
    )
    return optax.chain(*parts), schedule
