"""A tiny fp32 model, optimizer, rules and batch for the sharding tests (imported by tests here).

Three layers, so a stacked parameter [3, ...] is never confused with a single layer's shape.
"""

from __future__ import annotations

import pathlib

import gin
import jax
import numpy as np
from flax import nnx

from qwen_jax import configurables
from qwen_jax.model.config import QwenConfig
from qwen_jax.model.layers import Runtime
from qwen_jax.model.transformer import Qwen2ForCausalLM
from qwen_jax.parallel import mesh as mesh_lib
from qwen_jax.train import optimizer as optimizer_lib
from qwen_jax.train import state as state_lib
from qwen_jax.train import step as step_lib

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]

# Heads (4) and KV heads (2) divide the tensor axis (2); untied so lm_head is its own parameter.
CONFIG = QwenConfig(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
    tie_word_embeddings=False,
    initializer_range=0.05,
)
BATCH, LENGTH = 8, 16


def rules_from_gin(name: str = "rules.gin"):
    gin.clear_config()
    try:
        gin.parse_config_file(str(REPO_ROOT / "configs" / "mesh" / name))
        return configurables.logical_rules()
    finally:
        gin.clear_config()


def optimizer():
    # eps 1e-6 instead of 1e-8: the gradient of k_proj.bias is analytically zero (softmax ignores a
    # shift shared by all keys), and Adam turns its float noise (~1e-10, different for every
    # reduction order) into steps of lr * noise / (|noise| + eps); every other gradient is >> 1e-6.
    return optimizer_lib.make_optimizer(
        optimizer_lib.warmup_cosine(peak_lr=1e-3, warmup_steps=1, total_steps=10), eps=1e-6
    )


def factory(config=CONFIG, attention_impl="xla"):
    runtime = Runtime(attention_impl=attention_impl)
    return lambda: Qwen2ForCausalLM(config, runtime, rngs=nnx.Rngs(0))


def host_batch(batch=BATCH, length=LENGTH, seed=0):
    """Two packed documents per row, with padding at the end of half the rows."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, CONFIG.vocab_size, (batch, length + 1)).astype(np.int32)
    split = length // 2 + 3
    segment_ids = np.where(np.arange(length) < split, 1, 2).astype(np.int32)[None].repeat(batch, 0)
    segment_ids[::2, -3:] = 0
    positions = (
        np.where(np.arange(length) < split, np.arange(length), np.arange(length) - split)
        .astype(np.int32)[None]
        .repeat(batch, 0)
    )
    loss_mask = (segment_ids != 0).astype(np.float32)
    loss_mask[:, split - 1] = 0  # no prediction across the document boundary
    return {
        "inputs": ids[:, :-1],
        "targets": ids[:, 1:],
        "loss_mask": loss_mask,
        "segment_ids": segment_ids,
        "positions": positions,
    }


def build(
    mesh, rules, *, attention_impl="xla", microbatches=1, opt=None, batch=None, nan_policy="skip"
):
    """(state, train_step, device batch) on `mesh`."""
    opt, schedule = opt or optimizer()
    state, graphdef, shardings = state_lib.create_train_state(
        factory(attention_impl=attention_impl), opt, mesh, rules
    )
    batch = host_batch() if batch is None else batch
    batch_shardings = mesh_lib.batch_shardings(mesh, rules, batch)
    device_batch = {k: jax.device_put(v, batch_shardings[k]) for k, v in batch.items()}
    step = step_lib.make_train_step(
        graphdef,
        step_lib.lm_loss_fn,
        opt,
        mesh=mesh,
        rules=rules,
        state_shardings=shardings,
        batch_shardings=batch_shardings,
        schedule=schedule,
        microbatches=microbatches,
        nan_policy=nan_policy,
    )
    return state, step, device_batch


def to_host(tree):
    return jax.tree.map(np.asarray, tree)
