"""The projection's hand-written gradient against JAX's autodiff of the same contraction."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen_jax.model.layers import project


def _plain(x, kernel):
    inputs = tuple(range(x.ndim - 2))
    dims = ((tuple(d + 2 for d in inputs), inputs), ((), ()))
    return jax.lax.dot_general(x, kernel, dims)


@pytest.mark.parametrize(
    "x_shape, kernel_shape",
    [
        ((2, 5, 8), (8, 3, 4)),  # q/k/v: x narrower than the output
        ((2, 5, 3, 4), (3, 4, 8)),  # o_proj: two contracted dims, x wider than the output
        ((2, 5, 8), (8, 22)),  # gate/up: x narrower
        ((2, 5, 22), (22, 8)),  # down: x wider
    ],
)
def test_project_equals_autodiff(x_shape, kernel_shape):
    rng = np.random.default_rng(0)
    x = rng.normal(size=x_shape).astype(np.float32)
    kernel = rng.normal(size=kernel_shape).astype(np.float32)
    want_y, want_vjp = jax.vjp(_plain, x, kernel)
    got_y, got_vjp = jax.vjp(project, x, kernel)
    np.testing.assert_allclose(got_y, want_y, rtol=1e-6, atol=1e-6)
    cotangent = rng.normal(size=want_y.shape).astype(np.float32)
    for got, want in zip(got_vjp(cotangent), want_vjp(cotangent)):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize(
    "x_shape, kernel_shape",
    [((2, 128, 64), (64, 4, 16)), ((2, 128, 4, 16), (4, 16, 64)), ((2, 128, 176), (176, 64))],
)
def test_project_in_bfloat16_accumulates_in_float32(x_shape, kernel_shape):
    """bf16 operands, long sums (the kernel's gradient sums 256 tokens): each result is the
    float32 product of the same bf16 values rounded once to bf16, give or take that rounding."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=x_shape), jnp.bfloat16)
    kernel = jnp.asarray(rng.normal(size=kernel_shape), jnp.bfloat16)
    y, vjp = jax.vjp(project, x, kernel)
    cotangent = jnp.asarray(rng.normal(size=y.shape), jnp.bfloat16)
    f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
    want_y, want_vjp = jax.vjp(_plain, f32(x), f32(kernel))
    for got, want in zip((y, *vjp(cotangent)), (want_y, *want_vjp(f32(cotangent)))):
        assert got.dtype == jnp.bfloat16
        # One bf16 rounding is at most 2^-8 relative; a sum accumulated in bf16 drifts further.
        np.testing.assert_allclose(f32(got), want, rtol=2**-8, atol=1e-6)


def test_bfloat16_gradients_of_scanned_projections_run():
    """An MLP's up and down projections in a layer scan, differentiated in bf16. With the output
    gradient first in the down projection's kernel gradient, XLA's CPU backend compiled this
    into a product its generic dot cannot run (UNIMPLEMENTED: BF16 x BF16 = F32)."""

    def loss(kernels, x, dtype):
        def layer(h, k):
            up, down = (w.astype(dtype) for w in k)
            return h + project(jnp.tanh(project(h, up)), down), None

        h, _ = jax.lax.scan(layer, x.astype(dtype), kernels)
        return jnp.sum(h.astype(jnp.float32) ** 2)

    rng = np.random.default_rng(0)
    kernels = tuple(
        jnp.asarray(rng.normal(size=shape) * 0.1, jnp.float32)
        for shape in ((2, 64, 176), (2, 176, 64))
    )
    x = jnp.asarray(rng.normal(size=(2, 16, 64)), jnp.bfloat16)
    grad = jax.jit(jax.grad(loss), static_argnums=2)
    got, want = grad(kernels, x, jnp.bfloat16), grad(kernels, x, jnp.float32)
    for g, w in zip(got, want):
        assert np.linalg.norm(g - w) <= 0.05 * np.linalg.norm(w)
