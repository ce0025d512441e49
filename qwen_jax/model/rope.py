"""Rotary position embeddings with optional YaRN scaling, matching transformers' Qwen2."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from qwen_jax.model.config import RopeScaling


def inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> np.ndarray:
    """Per-pair rotation frequencies [head_dim // 2], computed on the host in float32."""
    exponents = np.arange(0, head_dim, 2, dtype=np.float32) / head_dim
    pos_freqs = np.power(np.float32(theta), exponents, dtype=np.float32)
    inv_freq = (1.0 / pos_freqs).astype(np.float32)
    if scaling is None:
        return inv_freq

    # YaRN: keep high frequencies (fast rotations) as they are, interpolate the low ones by
    # `factor`, and blend linearly between the two correction dimensions.
    def correction_dim(num_rotations: float) -> float:
        return (
            head_dim
            * math.log(scaling.original_max_position_embeddings / (num_rotations * 2 * math.pi))
        ) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(scaling.beta_fast)), 0)
    high = min(math.ceil(correction_dim(scaling.beta_slow)), head_dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = np.clip((np.arange(head_dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolation_weight = (1 - ramp).astype(np.float32)
    interpolated = (1.0 / (scaling.factor * pos_freqs)).astype(np.float32)
    return (interpolated * (1 - extrapolation_weight) + inv_freq * extrapolation_weight).astype(
        np.float32
    )


def rotary_tables(
    positions: jnp.ndarray, head_dim: int, theta: float, scaling: RopeScaling | None
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos and sin of shape [batch, length, head_dim] for integer positions [batch, length]."""
    inv_freq = jnp.asarray(inverse_frequencies(head_dim, theta, scaling))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    factor = scaling.attention_factor if scaling is not None else 1.0
    return jnp.cos(angles) * factor, jnp.sin(angles) * factor


def apply_rotary(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Rotates x [batch, length, heads, head_dim] by the half-split convention of transformers."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    out = x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin
    return out.astype(x.dtype)
