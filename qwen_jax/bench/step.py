"""Train-step throughput on the local devices: tokens/s, step time and MFU.

    python -m qwen_jax.bench.step --gin_file=configs/models/qwen2_5_0_5b.gin \
        --seq_len=4096 --batch=8 --steps=10

With `--grpo_new_tokens=N`, a GRPO step instead: `--batch` rows (`--grpo_generations` per
prompt) of `seq_len - N` prompt tokens each sample N new tokens with the KV-cache decoder from
the current parameters (no stop token, so every row generates all N), then the GRPO update on
those rows; it prints generated tokens/s and the share of the step spent generating.

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
from qwen_jax.model.generate import Sampling, generate
from qwen_jax.parallel import mesh as mesh_lib
from qwen_jax.train import grpo
from qwen_jax.train import metrics as metrics_lib
from qwen_jax.train import optimizer as optimizer_lib
from qwen_jax.train.state import create_train_state
from qwen_jax.train.grpo_task import completion_rows
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


def run_grpo(
    config: QwenConfig,
    runtime: Runtime,
    mesh,
    rules,
    *,
    seq_len: int,
    batch: int,
    new_tokens: int,
    generations: int,
    steps: int,
):
    """Rollout (sampling) and update times of GRPO steps on random prompts."""
    if not 0 < new_tokens < seq_len or batch % generations:
        raise ValueError("--grpo_new_tokens must be in (0, seq_len); --batch a multiple of G")
    optimizer, _ = optimizer_lib.make_optimizer(schedule=optimizer_lib.constant(1e-6))
    state, graphdef, shardings = create_train_state(
        lambda: Qwen2ForCausalLM(config, runtime, rngs=nnx.Rngs(0)), optimizer, mesh, rules
    )
    rng = np.random.default_rng(0)
    prompt_len = seq_len - new_tokens
    prompts = np.repeat(
        rng.integers(0, config.vocab_size, (batch // generations, prompt_len), dtype=np.int32),
        generations,
        axis=0,
    )
    prompt_mask = np.ones_like(prompts)
    loss_fn = grpo.make_grpo_loss_fn(
        grpo.GRPOConfig(num_generations=generations),
        max_completion_length=new_tokens,
        temperature=1.0,
        chunk_size=min(seq_len, 1024),
    )
    shapes = {k: jax.ShapeDtypeStruct((batch, seq_len), np.int32) for k in ("inputs", "targets")}
    shapes.update(
        positions=shapes["inputs"],
        segment_ids=shapes["inputs"],
        completion_mask=jax.ShapeDtypeStruct((batch, seq_len), np.float32),
        advantages=jax.ShapeDtypeStruct((batch,), np.float32),
    )
    batch_shardings = mesh_lib.batch_shardings(mesh, rules, shapes)
    train_step = make_train_step(
        graphdef,
        loss_fn,
        optimizer,
        mesh=mesh,
        rules=rules,
        state_shardings=shardings,
        batch_shardings=batch_shardings,
    )
    never = config.vocab_size  # an id no sampler draws: every row generates all its tokens
    timings = []
    for step in range(steps + 1):  # the first compiles
        start = time.perf_counter()
        tokens, lengths = generate(
            nnx.merge(graphdef, state.params),
            prompts,
            prompt_mask,
            max_new_tokens=new_tokens,
            stop_tokens=(never,),
            sampling=Sampling(temperature=1.0),
            rng=jax.random.key(step),
        )
        tokens, lengths = np.asarray(tokens), np.asarray(lengths)
        generated = time.perf_counter()
        rows = completion_rows(prompts, prompt_mask, tokens, lengths, pad_id=0)
        rows["advantages"] = rng.normal(size=batch).astype(np.float32)
        state, metrics = train_step(state, jax.device_put(rows, batch_shardings))
        jax.block_until_ready(metrics)
        timings.append((generated - start, time.perf_counter() - generated))
    generate_s, update_s = np.mean(timings[1:], axis=0)
    return {
        "device": jax.devices()[0].device_kind,
        "num_devices": jax.device_count(),
        "params": sum(x.size for x in jax.tree.leaves(state.params)),
        "dtype": runtime.dtype,
        "rows": batch,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "generate_s": round(float(generate_s), 4),
        "update_s": round(float(update_s), 4),
        "generated_tokens_per_s": round(batch * new_tokens / float(generate_s)),
        "generate_share": round(float(generate_s / (generate_s + update_s)), 3),
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
    common = dict(seq_len=FLAGS.seq_len, batch=FLAGS.batch, steps=FLAGS.steps)
    model = (configurables.QwenConfig(), configurables.Runtime(), mesh, rules)
    if FLAGS.grpo_new_tokens:
        figures = run_grpo(
            *model,
            new_tokens=FLAGS.grpo_new_tokens,
            generations=FLAGS.grpo_generations,
            **common,
        )
    else:
        figures = run(*model, **common)
    print(json.dumps(figures))


if __name__ == "__main__":
    flags.DEFINE_integer("seq_len", 4096, "tokens per row")
    flags.DEFINE_integer("batch", 8, "rows per step (global)")
    flags.DEFINE_integer("steps", 10, "timed steps after the compiling one")
    flags.DEFINE_integer("grpo_new_tokens", 0, "time a GRPO step sampling this many tokens")
    flags.DEFINE_integer("grpo_generations", 8, "GRPO completions per prompt")
    FLAGS = flags.FLAGS
    app.run(lambda argv: sys.exit(cli.run(main, argv)))
