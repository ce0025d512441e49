"""Train-step throughput on the local devices: tokens/s, step time and MFU.

    python -m qwen_jax.bench.step --gin_file=configs/models/qwen2_5_0_5b.gin \
        --seq_len=4096 --batch=8 --steps=10

Runs the real sharded train step (forward, backward, AdamW update) on synthetic packed batches,
with bf16 compute over fp32 master weights and the mesh from `configs/mesh/rules.gin` (FSDP over
all local devices unless `--gin_param` says otherwise). Prints one JSON line.
"""

from __future__ import annotations

import json
import sys
import time

import jax
import numpy as np
from absl import app, flags
from flax import nnx

from qwen_jax import cli
from qwen_jax.model.config import QwenConfig, model_flops_per_token
from qwen_jax.model.layers import Runtime
from qwen_jax.model.transformer import Qwen2ForCausalLM
from qwen_jax.parallel import mesh as mesh_lib
from qwen_jax.train import metrics as metrics_lib
from qwen_jax.train import optimizer as optimizer_lib
from qwen_jax.train.state import create_train_state
from qwen_jax.train.step import lm_loss_fn, make_train_step


def synthetic_batch(config: QwenConfig, batch: int, seq_len: int, documents_per_row: int = 4):
    """Random tokens in rows of equal-length packed documents (segment ids and positions set)."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, config.vocab_size, (batch, seq_len + 1), dtype=np.int32)
    doc_len = seq_len // documents_per_row
    index = np.arange(seq_len)
    segment_ids = np.broadcast_to(
        np.minimum(index // doc_len, documents_per_row - 1) + 1, (batch, seq_len)
    ).astype(np.int32)
    positions = np.broadcast_to(index - (segment_ids[0] - 1) * doc_len, (batch, seq_len))
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "loss_mask": np.ones((batch, seq_len), np.float32),
        "segment_ids": segment_ids,
        "positions": positions.astype(np.int32),
    }


def run(config: QwenConfig, runtime: Runtime, mesh, rules, *, seq_len: int, batch: int, steps: int):
    optimizer, _ = optimizer_lib.make_optimizer(schedule=optimizer_lib.constant(1e-4))
    state, graphdef, shardings = create_train_state(
        lambda: Qwen2ForCausalLM(config, runtime, rngs=nnx.Rngs(0)), optimizer, mesh, rules
    )
    host_batch = synthetic_batch(config, batch, seq_len)
    batch_shardings = mesh_lib.batch_shardings(mesh, rules, host_batch)
    device_batch = jax.device_put(host_batch, batch_shardings)
    train_step = make_train_step(
        graphdef,
        lm_loss_fn,
        optimizer,
        mesh=mesh,
        rules=rules,
        state_shardings=shardings,
        batch_shardings=batch_shardings,
    )
    start = time.perf_counter()
    state, metrics = train_step(state, device_batch)
    jax.block_until_ready(metrics)
    compile_and_first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = train_step(state, device_batch)
    loss = float(jax.block_until_ready(metrics)["loss"])
    step_time = (time.perf_counter() - start) / steps
    tokens_per_second = batch * seq_len / step_time
    mfu = metrics_lib.mfu(model_flops_per_token(config, seq_len), tokens_per_second)
    return {
        "device": jax.devices()[0].device_kind,
        "num_devices": jax.device_count(),
        "mesh": dict(mesh.shape),
        "params": sum(x.size for x in jax.tree.leaves(state.params)),
        "seq_len": seq_len,
        "batch": batch,
        "dtype": runtime.dtype,
        "remat_policy": runtime.remat_policy,
        "attention_impl": runtime.attention_impl,
        "first_step_s": round(compile_and_first, 2),
        "step_time_s": round(step_time, 4),
        "tokens_per_s": round(tokens_per_second),
        "mfu": None if mfu is None else round(mfu, 4),
        "final_loss": round(loss, 4),
    }


def main() -> None:
    from qwen_jax import configurables

    # A training run's defaults: bf16 compute over fp32 master weights, the shipped rules.
    cli.parse_gin(
        cli.GIN_FILE.value,
        cli.GIN_PARAM.value,
        defaults=["include 'configs/mesh/rules.gin'", "layers.Runtime.dtype = 'bfloat16'"],
    )
    mesh, rules = configurables.mesh_and_rules()
    figures = run(
        configurables.QwenConfig(),
        configurables.Runtime(),
        mesh,
        rules,
        seq_len=FLAGS.seq_len,
        batch=FLAGS.batch,
        steps=FLAGS.steps,
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    flags.DEFINE_integer("seq_len", 4096, "tokens per row")
    flags.DEFINE_integer("batch", 8, "rows per step (global)")
    flags.DEFINE_integer("steps", 10, "timed steps after the compiling one")
    FLAGS = flags.FLAGS
    app.run(lambda argv: sys.exit(cli.run(main, argv)))
