"""The training loop shared by pre-training, SFT and DPO.

    state <- newest complete checkpoint in the workdir, else the initial weights
    for each batch:  [stage changed? rebuild the step for the new architecture]
                     state, metrics = train_step(state, batch)      (jitted, donated)
                     periodic work: log, eval, checkpoint, profile; SIGTERM -> save and leave

Task specifics (data, loss, stages, eval) live in `qwen_jax.train.tasks`; the step itself in
`qwen_jax.train.step`; checkpoint I/O in `qwen_jax.checkpoint.manager`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from qwen_jax.checkpoint.manager import CheckpointConfig, TrainCheckpointer
from qwen_jax.data.tokenizer import Tokenizer
from qwen_jax.model.config import QwenConfig
from qwen_jax.model.layers import Runtime
from qwen_jax.model.transformer import Qwen2ForCausalLM
from qwen_jax.parallel import mesh as mesh_lib
from qwen_jax.train import metrics as metrics_lib
from qwen_jax.train import run_tokenizer
from qwen_jax.train.optimizer import make_optimizer
from qwen_jax.train.preemption import PreemptionWatcher
from qwen_jax.train.state import abstract_model, create_train_state
from qwen_jax.train.step import make_train_step

RUN_FILE = "run.json"
# Step metrics that are bookkeeping for the step, not for the reader.
_UNLOGGED = ("weight", "nll_sum", "z_loss_sum", "nonfinite")


class NonFiniteError(RuntimeError):
    """Raised with nan_policy='stop': the newest checkpoint is the last good one."""


@dataclasses.dataclass
class Result:
    step: int
    workdir: str
    train: dict  # the last logged training metrics
    eval: dict  # the last evaluation's scalars
    eval_at_start: dict  # the evaluation before the first step (with eval_at_start)


def _gin_binds_model() -> bool:
    try:
        gin.query_parameter("QwenConfig.hidden_size")
        return True
    except ValueError:
        return False


def _model_config(init_config: QwenConfig | None) -> QwenConfig:
    """The architecture: the initial checkpoint's, or the one bound in gin (a model preset);
    when both are given they must agree."""
    if init_config is None or not _gin_binds_model():
        return init_config or QwenConfig()
    bound, loaded = QwenConfig().to_hf_config(), init_config.to_hf_config()
    diff = {k: (v, loaded.get(k)) for k, v in bound.items() if loaded.get(k) != v}
    if diff:
        raise ValueError(
            f"the model bound in gin differs from the initial checkpoint's "
            f"(field: (gin, checkpoint)): {diff}"
        )
    return init_config


def _check_run(workdir: str, identity: dict, info: dict) -> None:
    """A workdir belongs to one run: same task, architecture and tokenizer (`identity`), or a
    clear refusal. run.json also records `info` (e.g. where the tokenizer came from)."""
    path = os.path.join(workdir, RUN_FILE)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            recorded = json.load(f)
        diff = sorted(k for k in identity if recorded.get(k) != identity[k])
        if diff:
            raise ValueError(
                f"workdir {workdir} holds a different run ({', '.join(diff)} differ "
                f"from {path}); choose another --workdir"
            )
        return
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
        raise ValueError(
            f"workdir {workdir} has checkpoints but no {RUN_FILE}; it was not made by "
            f"this trainer. Choose another --workdir"
        )
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:
        with open(path, "w", encoding="utf-8") as f:
            json.dump({**identity, **info}, f, indent=1)


def _to_device(batch: dict, shardings: dict) -> dict:
    """Host-local numpy rows -> global arrays sharded over the batch axes (multi-host safe)."""
    return {
        k: jax.make_array_from_process_local_data(shardings[k], np.asarray(v))
        for k, v in batch.items()
    }


class _StepBuilder:
    """Compiles the train step once per architecture (stage) and batch shape."""

    def __init__(
        self,
        task,
        base_config,
        runtime,
        optimizer,
        schedule,
        mesh,
        rules,
        state_shardings,
        microbatches,
        nan_policy,
    ):
        self.task, self.base_config, self.runtime = task, base_config, runtime
        self.optimizer, self.schedule = optimizer, schedule
        self.mesh, self.rules, self.state_shardings = mesh, rules, state_shardings
        self.microbatches, self.nan_policy = microbatches, nan_policy
        self._key = None
        self.config = self.graphdef = self.train_step = self.batch_shardings = None

    def for_batch(self, stage: str, batch: dict):
        shapes = tuple(sorted((k, np.shape(v)) for k, v in batch.items()))
        if (stage, shapes) != self._key:
            self.config = self.task.model_config(self.base_config, stage)
            self.graphdef = abstract_model(
                lambda: Qwen2ForCausalLM(self.config, self.runtime, rngs=nnx.Rngs(0))
            )[0]
            self.batch_shardings = mesh_lib.batch_shardings(self.mesh, self.rules, batch)
            self.train_step = make_train_step(
                self.graphdef,
                self.task.loss_fn,
                self.optimizer,
                mesh=self.mesh,
                rules=self.rules,
                state_shardings=self.state_shardings,
                batch_shardings=self.batch_shardings,
                schedule=self.schedule,
                microbatches=self.microbatches,
                nan_policy=self.nan_policy,
            )
            if self._key is not None:
                logging.info("stage %r: architecture or batch shape changed; recompiling", stage)
            self._key = (stage, shapes)
        return self.train_step

    def eval_step(self, params, frozen):
        """`eval_step(batch) -> (loss_sum, aux)` with the current architecture."""
        graphdef, loss_fn = self.graphdef, self.task.loss_fn

        @jax.jit
        def run(params, frozen, batch):
            return loss_fn(nnx.merge(graphdef, params), batch, frozen)

        return lambda batch: run(params, frozen, batch)

    def model(self, params):
        return nnx.merge(self.graphdef, jax.tree.map(jnp.asarray, params))


def _load_init(init_from: str | None, shardings):
    if init_from is None:
        return None, None
    from qwen_jax.checkpoint.model_io import load_model_checkpoint  # the model issue's format

    if not os.path.isdir(init_from):
        raise FileNotFoundError(f"init_from={init_from}: no such checkpoint directory")
    return load_model_checkpoint(init_from, shardings=shardings)


@gin.configurable(denylist=["workdir"])
def train(
    workdir: str,
    *,
    task=gin.REQUIRED,
    total_steps: int | None = None,
    seed: int = 0,
    init_from: str | None = None,
    tokenizer_path: str | None = None,
    checkpoint: CheckpointConfig = CheckpointConfig(),
    log_every: int = 10,
    eval_every: int | None = None,
    eval_at_start: bool = False,
    profile_steps: Sequence[int] = (),
    microbatches: int = 1,
    nan_policy: str = "skip",
) -> Result:
    """Trains `task` in `workdir`, resuming from its newest complete checkpoint.

    total_steps: batches to train; None: the task's own count (the sum of the pre-training
      stages) or until the data ends (SFT/DPO epochs).
    init_from: a model checkpoint directory (import_hf's output, or a step directory of another
      run) to start from; the DPO reference defaults to it.
    tokenizer_path: a tokenizer.json (or its directory); default: the one `init_from` carries
      (`qwen_jax.train.run_tokenizer`). A run from scratch must name one.
    profile_steps: (first, count): a JAX profiler trace of those steps into workdir/profile.
    nan_policy: 'skip' (drop the update, count it) or 'stop' (stop; the last checkpoint is good).
    """
    workdir = os.path.abspath(workdir)
    total_steps = total_steps or task.total_steps
    tokenizer_path = run_tokenizer.resolve(tokenizer_path, init_from)
    tokenizer = Tokenizer.from_file(tokenizer_path)
    logging.info("tokenizer %s: %d ids", tokenizer_path, tokenizer.vocab_size)
    mesh = mesh_lib.make_mesh()
    rules = mesh_lib.logical_rules()
    optimizer, schedule = make_optimizer()
    runtime = Runtime()

    # The architecture, and the weights to start from.
    init_config = None
    if init_from is not None:
        from qwen_jax.checkpoint.model_io import read_model_config

        init_config = read_model_config(init_from)
    base_config = _model_config(init_config)
    run_tokenizer.check(tokenizer, tokenizer_path, base_config, init_from)
    iterator = task.iterator(tokenizer, seed)  # fails on missing data before the workdir is touched
    precompute = getattr(task, "precompute_reference", False)
    reference_dir = (getattr(task, "reference", None) or init_from) if precompute else None
    if precompute and reference_dir is None:
        raise ValueError(
            "DPOTask.precompute_reference needs the reference's weights: set "
            "loop.train.init_from or DPOTask.reference"
        )
    _check_run(
        workdir,
        {
            "task": task.kind,
            "model": base_config.to_hf_config(),
            "tokenizer": run_tokenizer.identity(tokenizer),
        },
        {"tokenizer_path": tokenizer_path},
    )
    if jax.process_index() == 0:
        run_tokenizer.keep(workdir, tokenizer_path)
    checkpointer = TrainCheckpointer(os.path.join(workdir, "checkpoints"), checkpoint)
    step = checkpointer.latest_step()
    if step is not None and total_steps is not None and step >= total_steps:
        # A scheduler that retries until exit 0, or a kill after the final save, lands here.
        checkpointer.close()
        logging.info("the run in %s is complete at step %d: nothing to do", workdir, step)
        return Result(step=step, workdir=workdir, train={}, eval={}, eval_at_start={})
    if precompute:
        from qwen_jax.checkpoint.model_io import load_model

        task.prepare_reference(
            workdir, tokenizer, lambda: load_model(reference_dir, runtime, mesh=mesh, rules=rules)
        )
        iterator = task.iterator(tokenizer, seed)  # now carrying the reference log-probs
    stage = task.stage(iterator)
    config = task.model_config(base_config, stage)
    state, _, shardings = create_train_state(
        lambda: Qwen2ForCausalLM(config, runtime, rngs=nnx.Rngs(seed)),
        optimizer,
        mesh,
        rules,
        with_frozen=task.needs_frozen,
    )
    if step is not None:
        restored = checkpointer.restore(
            step, params=state.params, opt_state=state.opt_state, frozen=state.frozen
        )
        if restored["model_config"] != base_config.to_hf_config():
            raise ValueError(
                f"checkpoint {checkpointer.directory}/{step} is of another model "
                f"than the one configured"
            )
        meta = restored["train_meta"]
        state = state.replace(
            params=restored["params"],
            opt_state=restored["opt_state"],
            frozen=restored.get("frozen"),
            step=jnp.asarray(meta["state_step"], jnp.int32),
            skipped=jnp.asarray(meta["skipped"], jnp.int32),
        )
        state = jax.device_put(state, shardings)
        iterator.set_state(restored["data_state"])
        stage = task.stage(iterator)
        logging.info("resumed from %s/%d (stage %r)", checkpointer.directory, step, meta["stage"])
    else:
        step = 0
        if init_from is not None:
            _, params = _load_init(init_from, shardings.params)
            state = state.replace(params=params)
        if task.needs_frozen:
            reference = getattr(task, "reference", None) or None
            frozen = (
                state.params if reference is None else _load_init(reference, shardings.params)[1]
            )
            # A copy: the step donates the state, and params and frozen must not share buffers.
            state = state.replace(
                frozen=jax.jit(lambda t: jax.tree.map(jnp.copy, t), out_shardings=shardings.params)(
                    frozen
                )
            )

    builder = _StepBuilder(
        task,
        base_config,
        runtime,
        optimizer,
        schedule,
        mesh,
        rules,
        shardings,
        microbatches,
        nan_policy,
    )
    writer = metrics_lib.MetricWriter(workdir, total_steps or 0)
    watcher = PreemptionWatcher()
    last_train, last_eval, first_eval = {}, {}, {}

    def save(step: int) -> None:
        meta = {
            "step": step,
            "stage": task.stage(iterator),
            "seed": seed,
            "state_step": int(state.step),
            "skipped": int(state.skipped),
        }
        checkpointer.save(
            step,
            params=state.params,
            opt_state=state.opt_state,
            frozen=state.frozen,
            model_config=base_config.to_hf_config(),
            meta=meta,
            data_state=iterator.get_state(),
        )

    def evaluate(step: int, stage: str) -> dict:
        scalars, text = task.evaluate(
            builder.model(state.params),
            state.frozen,
            tokenizer,
            builder.eval_step(state.params, state.frozen),
            stage,
        )
        if scalars:
            writer.write(step, scalars, prefix="eval")
        if text:
            writer.text(step, "eval/samples", text)
        return scalars

    window_start, window_steps = time.monotonic(), 0
    first_step = step
    profiling = preempted = False
    try:
        while total_steps is None or step < total_steps:
            if watcher.should_stop(step):
                logging.warning("SIGTERM: saving step %d and exiting", step)
                save(step)
                preempted = True
                break
            try:
                batch = next(iterator)
            except StopIteration:
                break
            train_step = builder.for_batch(stage, batch)
            if eval_at_start and step == 0:
                first_eval = evaluate(step, stage)
            if profile_steps and step == profile_steps[0]:
                jax.profiler.start_trace(os.path.join(workdir, "profile"))
                profiling = True
            state, step_metrics = train_step(state, _to_device(batch, builder.batch_shardings))
            step += 1
            window_steps += 1
            if profiling and step >= profile_steps[0] + profile_steps[1]:
                jax.block_until_ready(state)
                jax.profiler.stop_trace()
                profiling = False
            if nan_policy == "stop" and bool(step_metrics["nonfinite"]):
                raise NonFiniteError(
                    f"non-finite loss or gradients at step {step}; stopping "
                    f"(newest checkpoint: {checkpointer.latest_step()})"
                )
            next_stage = task.stage(iterator)
            if step % log_every == 0 or step == total_steps or next_stage != stage:
                host = jax.device_get(task.step_metrics(step_metrics))
                seconds = (time.monotonic() - window_start) / window_steps
                tokens_per_s = float(host["tokens"]) / seconds
                seq_len = max(np.shape(v)[-1] for v in batch.values() if np.ndim(v) == 2)
                flops = metrics_lib.model_flops_per_token(builder.config, seq_len)
                last_train = {k: v for k, v in host.items() if k not in _UNLOGGED}
                last_train.update(
                    {
                        "step_time_s": seconds,
                        "tokens_per_s": tokens_per_s,
                        "mfu": metrics_lib.mfu(flops, tokens_per_s),
                    }
                )
                writer.write(step, last_train, label=f"stage={stage}")
                window_start, window_steps = time.monotonic(), 0
            if eval_every and step % eval_every == 0:
                last_eval = evaluate(step, stage)
            if checkpointer.should_save(step):
                save(step)
            stage = next_stage
        if step > first_step and not preempted:
            save(step)
            if not eval_every or step % eval_every:
                last_eval = evaluate(step, stage)
    finally:
        if profiling:
            jax.profiler.stop_trace()
        checkpointer.close()
        writer.close()
        watcher.close()
    return Result(
        step=step, workdir=workdir, train=last_train, eval=last_eval, eval_at_start=first_eval
    )
