"""The projection's hand-written gradient against JAX's autodiff of the same contraction."""

from __future__ import annotations

import jax
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
