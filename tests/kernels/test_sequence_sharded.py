"""Attention under shard_map over a sharded sequence axis, and query blocking, equal plain attention."""

from __future__ import annotations

import gin
import jax
import jax.numpy as jnp
import numpy as np

from qwen_jax import configurables
from qwen_jax.cli import REPO_ROOT
from qwen_jax.kernels import registry, sequence_sharded
from qwen_jax.kernels.xla import xla_attention
from qwen_jax.parallel import mesh as mesh_lib


def _rules():
    gin.clear_config()
    try:
        gin.parse_config_file(f"{REPO_ROOT}/configs/mesh/rules.gin")
        return configurables.logical_rules()
    finally:
        gin.clear_config()


def _inputs(b=4, t=32, heads=4, kv_heads=2, d=8):
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(b, t, heads, d)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(b, t, kv_heads, d)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(b, t, kv_heads, d)), jnp.float32)
    # Two packed documents, the second left at padding in some rows.
    seg = np.where(np.arange(t) < 13, 1, 2)[None].repeat(b, 0).astype(np.int32)
    seg[1, -5:] = 0
    pos = np.where(np.arange(t) < 13, np.arange(t), np.arange(t) - 13)[None].repeat(b, 0)
    tokens = dict(
        q_segment_ids=seg,
        kv_segment_ids=seg,
        q_positions=pos.astype(np.int32),
        kv_positions=pos.astype(np.int32),
    )
    return q, k, v, {name: jnp.asarray(x) for name, x in tokens.items()}


def test_sequence_sharded_attention_equals_xla_attention():
    q, k, v, tokens = _inputs()
    expected = xla_attention(q, k, v, **tokens)
    mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(fsdp=2, tensor=2, sequence=2))
    # 16 local queries: two blocks per shard.
    fn = registry.attention_fn("sequence_sharded", mesh=mesh, rules=_rules(), block_size=8)
    got = jax.jit(lambda *a, **kw: fn(*a, **kw))(q, k, v, **tokens)
    hlo = jax.jit(lambda *a, **kw: fn(*a, **kw)).lower(q, k, v, **tokens).as_text()
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)
    assert "all_gather" in hlo or "all-gather" in hlo


def test_query_blocked_gradients_match():
    q, k, v, tokens = _inputs(b=2, t=16)
    blocked = sequence_sharded.query_blocked(xla_attention, 4)

    def loss(fn):
        return lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v, **tokens)))

    got = jax.grad(loss(blocked), (0, 1, 2))(q, k, v)
    want = jax.grad(loss(xla_attention), (0, 1, 2))(q, k, v)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
