"""Matmul FLOPs counted on the traced program, loop bodies times their trip counts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from qwen_jax.model.config import QwenConfig, model_flops_per_token
from qwen_jax.model.layers import Runtime
from qwen_jax.model.transformer import Qwen2ForCausalLM
from qwen_jax.train.flops import step_flops
from qwen_jax.train.step import lm_loss_fn

LAYERS, TOKENS, WIDTH, OUT = 6, 4, 16, 8
ONE_MATMUL = 2 * TOKENS * WIDTH * OUT


def _stack(weights, x):
    def layer(carry, w):
        return carry, jnp.tanh(x @ w)

    return jax.lax.scan(layer, 0.0, weights)[1].sum()


def test_scan_bodies_count_once_per_step_and_remat_adds_the_forward():
    weights = jnp.ones((LAYERS, WIDTH, OUT))
    x = jnp.ones((TOKENS, WIDTH))
    assert step_flops(_stack, weights, x) == LAYERS * ONE_MATMUL
    # The backward pass adds one product per layer (the weights' gradient; x is a constant).
    assert step_flops(jax.grad(_stack), weights, x) == 2 * LAYERS * ONE_MATMUL
    assert step_flops(jax.grad(jax.checkpoint(_stack)), weights, x) == 3 * LAYERS * ONE_MATMUL
    # A cond counts the dearer branch once.
    both = lambda w, x: jax.lax.cond(x.sum() > 0, _stack, lambda w, x: 0.0, w, x)  # noqa: E731
    assert step_flops(both, weights, x) == LAYERS * ONE_MATMUL


def _training_flops(remat_policy: str) -> tuple[float, float]:
    """(counted / model FLOPs of a training step, the forward matmuls of the layers' projections
    whose inputs the backward pass needs / model FLOPs)."""
    config = QwenConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    runtime = Runtime(remat_policy=remat_policy)
    model = nnx.eval_shape(lambda: Qwen2ForCausalLM(config, runtime, rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(model, nnx.Param)
    batch = {
        k: jax.ShapeDtypeStruct((4, 16), jnp.float32 if k == "loss_mask" else jnp.int32)
        for k in ("inputs", "targets", "loss_mask", "segment_ids", "positions")
    }

    def loss(p, b):
        return lm_loss_fn(nnx.merge(graphdef, p), b)[0]

    model_flops = model_flops_per_token(config, 16) * 4 * 16
    # o_proj's and down_proj's outputs only join the residual stream: remat need not redo them.
    recomputed = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(params["layers"]):
        name = jax.tree_util.keystr(path)
        if "kernel" in name and "o_proj" not in name and "down_proj" not in name:
            recomputed += 2 * leaf.size * 64
    return step_flops(jax.grad(loss), params, batch) / model_flops, recomputed / model_flops


def test_remat_policies_cost_what_they_recompute():
    ratios = {p: _training_flops(p)[0] for p in ("none", "save_dots_except_mlp", "full")}
    recomputed = _training_flops("none")[1]
    # No remat: one forward and backward, plus the attention scores that our XLA attention
    # recomputes and the causal half it does not skip (a few percent at 16 tokens).
    assert 1.0 < ratios["none"] < 1.05, ratios
    # Full remat repeats those projections (not the output head) and the attention scores.
    extra = ratios["full"] - ratios["none"]
    assert recomputed < extra < recomputed + 0.05, (ratios, recomputed)
    assert ratios["none"] < ratios["save_dots_except_mlp"] < ratios["full"]


def test_a_while_loop_is_refused():
    def loop(x):
        return jax.lax.while_loop(lambda c: c.sum() < 10, lambda c: c @ c, x)

    with pytest.raises(ValueError, match="no static trip count"):
        step_flops(loop, jnp.ones((2, 2)))


def test_a_shard_map_body_counts_once_per_device():
    mesh = jax.make_mesh((jax.device_count(),), ("x",))
    rows = 2 * jax.device_count()

    @jax.shard_map(
        mesh=mesh, in_specs=(PartitionSpec("x"), PartitionSpec()), out_specs=PartitionSpec("x")
    )
    def sharded(x, w):
        return x @ w

    x = jax.ShapeDtypeStruct(
        (rows, WIDTH), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec("x"))
    )
    w = jax.ShapeDtypeStruct(
        (WIDTH, OUT), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec())
    )
    assert step_flops(sharded, x, w) == 2 * rows * WIDTH * OUT
