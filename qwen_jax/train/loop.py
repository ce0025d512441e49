"""The training loop shared by pre-training, SFT, DPO and GRPO.

    train(workdir, setup):  claim the workdir for this run (run.json), or stop if it is complete
                            task.prepare (e.g. DPO's reference pass)
                            state <- newest complete checkpoint, else the initial weights
                            for each batch:  rows = task.rollout(batch) (GRPO samples here)
                                             [stage changed? rebuild the step]
                                             state, metrics = train_step(state, rows)
                                             periodic hooks: log, eval, checkpoint, profile;
                                             SIGTERM -> save and leave

The setup (`qwen_jax.train.setup`) is resolved before this module runs; a task is known only
through `qwen_jax.train.tasks.Task`; the step is `qwen_jax.train.step`; checkpoint I/O is
`qwen_jax.checkpoint.manager`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from qwen_jax.checkpoint import model_io, pretrained
from qwen_jax.checkpoint.manager import CheckpointError, TrainCheckpointer
from qwen_jax.data.shards import ShardedIterator
from qwen_jax.eval import in_loop
from qwen_jax.model.config import model_flops_per_token
from qwen_jax.model.transformer import abstract_model, build_model
from qwen_jax.parallel import host_data
from qwen_jax.train import metrics as metrics_lib
from qwen_jax.train import run_tokenizer
from qwen_jax.train import preemption
from qwen_jax.train.setup import TrainSetup
from qwen_jax.train.state import TrainState, create_train_state
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


def _check_run(workdir: str, identity: dict, info: dict) -> None:
    """A workdir belongs to one run: same task, architecture and tokenizer (`identity`), or a
    clear refusal. run.json also records `info` (e.g. where the tokenizer came from)."""
    path = os.path.join(workdir, RUN_FILE)
    if os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as f:
                recorded = json.load(f)
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(
                f"{path} is not a readable run file ({e}); it records which run the workdir "
                f"holds: restore it, or choose another --workdir"
            ) from None
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
        # Written whole and renamed into place: the other processes check the same workdir at
        # the same time, and one that read a half-written file would refuse the run and leave
        # process 0 waiting for it at the checkpoint manager's barrier.
        partial = f"{path}.{os.getpid()}.tmp"
        with open(partial, "w", encoding="utf-8") as f:
            json.dump({**identity, **info}, f, indent=1)
        os.replace(partial, path)


class _StepBuilder:
    """Compiles the train step once per architecture (stage) and batch shape."""

    def __init__(self, setup: TrainSetup, state_shardings: TrainState):
        self.setup, self.state_shardings = setup, state_shardings
        self.placement = host_data.Placement(setup.mesh, setup.rules)
        self._key = None
        self._architectures: dict[str, tuple] = {}
        self.config = self.graphdef = self.train_step = self.batch_shardings = None

    def architecture(self, stage: str):
        """(config, graphdef) of a stage's model."""
        if stage not in self._architectures:
            config = self.setup.task.model_config(self.setup.model_config, stage)
            self._architectures[stage] = (config, abstract_model(config, self.setup.runtime)[0])
        return self._architectures[stage]

    def for_batch(self, stage: str, batch: dict):
        shapes = tuple(sorted((k, np.shape(v)) for k, v in batch.items()))
        if (stage, shapes) != self._key:
            setup = self.setup
            self.config, self.graphdef = self.architecture(stage)
            self.batch_shardings = self.placement.shardings(host_data.global_shapes(batch))
            self.train_step = make_train_step(
                self.graphdef,
                setup.task.loss_fn,
                setup.optimizer,
                mesh=setup.mesh,
                rules=setup.rules,
                state_shardings=self.state_shardings,
                batch_shardings=self.batch_shardings,
                schedule=setup.schedule,
                microbatches=setup.run.microbatches,
                nan_policy=setup.run.nan_policy,
            )
            if self._key is not None:
                logging.info("stage %r: architecture or batch shape changed; recompiling", stage)
            self._key = (stage, shapes)
        return self.train_step

    def eval_step(self, params, frozen):
        """`eval_step(batch) -> (loss_sum, aux)` with the current architecture."""
        graphdef, loss_fn = self.graphdef, self.setup.task.loss_fn

        @jax.jit
        def run(params, frozen, batch):
            return loss_fn(nnx.merge(graphdef, params), batch, frozen)

        def step(batch):
            return run(params, frozen, self.placement.from_local(batch))

        return step

    def model(self, params, stage: str | None = None):
        graphdef = self.graphdef if stage is None else self.architecture(stage)[1]
        return nnx.merge(graphdef, jax.tree.map(jnp.asarray, params))


def _restore_newest(setup: TrainSetup, checkpointer: TrainCheckpointer, state: TrainState):
    """(restored items, step) of the newest step that restores, walking back from the newest;
    steps that do not restore are moved into `checkpoints/corrupt/` once an older one has, each
    named in one log line. (None, None) without checkpoints; an error when none restores."""
    failed = []
    for step in checkpointer.steps():
        try:
            restored = checkpointer.restore(
                step, params=state.params, opt_state=state.opt_state, frozen=state.frozen
            )
        except Exception as e:  # a missing or truncated item, a shape that does not match
            logging.debug("restoring step %d failed", step, exc_info=True)
            failed.append((step, " ".join(str(e).split())[:300] or type(e).__name__))
            continue
        stage = restored["train_meta"]["stage"]
        if (
            restored["model_config"]
            != setup.task.model_config(setup.model_config, stage).to_hf_config()
        ):
            raise ValueError(
                f"checkpoint {checkpointer.directory}/{step} is of another model "
                f"than the one configured"
            )
        for bad, reason in failed:
            moved = checkpointer.set_aside(bad)
            logging.warning(
                "checkpoint step %d does not restore (%s): moved to %s; using step %d",
                bad,
                reason,
                moved,
                step,
            )
        return restored, step
    if failed:
        raise CheckpointError(
            f"no checkpoint in {checkpointer.directory} restores (steps "
            f"{', '.join(str(s) for s, _ in failed)}; newest: {failed[0][1]}); refusing to "
            f"start over from scratch: move them away to do so"
        )
    return None, None


def _restore_or_init(setup: TrainSetup, checkpointer: TrainCheckpointer, iterator):
    """(state, shardings, step): the newest checkpoint that restores, or the initial weights at
    step 0 (the initial checkpoint's, else random) with the task's initial frozen parameters."""
    task, run = setup.task, setup.run
    config = task.model_config(setup.model_config, task.stage(iterator.first))
    state, _, shardings = create_train_state(
        lambda: build_model(config, setup.runtime, rngs=nnx.Rngs(run.seed)),
        setup.optimizer,
        setup.mesh,
        setup.rules,
        with_frozen=task.needs_frozen,
    )
    restored, step = _restore_newest(setup, checkpointer, state)
    if restored is not None:
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
        logging.info("resumed from %s/%d (stage %r)", checkpointer.directory, step, meta["stage"])
        return state, shardings, step

    def load_params(directory: str):
        dtype = setup.runtime.param_dtype
        if model_io.read_model_config(directory).num_labels != config.num_labels:
            # Another head over the same decoder (a reward model started from a causal LM).
            return model_io.load_decoder(directory, state.params, shardings.params, dtype)
        return model_io.load_model_checkpoint(directory, shardings.params, dtype)[1]

    if run.init_from is not None:
        state = state.replace(params=load_params(run.init_from))
    frozen = task.initial_frozen(state.params, load_params)
    if frozen is not None:
        # A copy: the step donates the state, and params and frozen must not share buffers.
        copy = jax.jit(lambda t: jax.tree.map(jnp.copy, t), out_shardings=shardings.params)
        state = state.replace(frozen=copy(frozen))
    return state, shardings, 0


def train(workdir: str, setup: TrainSetup) -> Result:
    """Trains `setup.task` in `workdir`, resuming from its newest checkpoint that restores.
    SIGTERM saves the step reached and returns (nothing is saved before the first step)."""
    with preemption.handled():
        return _train(os.path.abspath(workdir), setup)


def _data(setup: TrainSetup) -> ShardedIterator:
    """This process's shards of the run's training batches (`qwen_jax.data.shards`)."""
    task, run = setup.task, setup.run
    return ShardedIterator(
        lambda shard, count: task.iterator(
            setup.tokenizer, run.seed, shard_index=shard, shard_count=count
        ),
        run.data_shards or jax.process_count(),
        agree_on_end=task.finite_data,
    )


def _train(workdir: str, setup: TrainSetup) -> Result:
    task, run, tokenizer = setup.task, setup.run, setup.tokenizer
    logging.info("tokenizer %s: %d ids", setup.tokenizer_path, tokenizer.vocab_size)
    iterator = _data(setup)  # missing data fails before the workdir is touched
    _check_run(
        workdir,
        {
            "task": task.kind,
            "model": setup.model_config.to_hf_config(),
            "tokenizer": run_tokenizer.identity(tokenizer),
        },
        {"tokenizer_path": setup.tokenizer_path},
    )
    if jax.process_index() == 0:
        run_tokenizer.keep(workdir, setup.tokenizer_path)
    checkpointer = TrainCheckpointer(os.path.join(workdir, "checkpoints"), setup.checkpoint)
    placement = host_data.Placement(setup.mesh, setup.rules)
    try:
        prepared = task.prepare(
            workdir,
            tokenizer,
            run.init_from,
            lambda directory: pretrained.load(directory, setup.runtime, placement)[0],
            placement,
        )
        if prepared:  # the rows now carry what the preparation computed
            iterator = _data(setup)
        state, shardings, step = _restore_or_init(setup, checkpointer, iterator)
        if setup.total_steps is not None and step >= setup.total_steps:
            # A scheduler that retries until exit 0, or a kill after the final save, lands here.
            logging.info("the run in %s is complete at step %d: nothing to do", workdir, step)
            return Result(step=step, workdir=workdir, train={}, eval={}, eval_at_start={})
        return _Steps(workdir, setup, checkpointer, iterator, state, shardings).run(step)
    finally:
        checkpointer.close()


class _Steps:
    """The step loop and its periodic hooks (log, eval, checkpoint, profile, SIGTERM)."""

    def __init__(self, workdir, setup: TrainSetup, checkpointer, iterator, state, shardings):
        self.workdir, self.setup = workdir, setup
        self.checkpointer, self.iterator, self.state = checkpointer, iterator, state
        self.builder = _StepBuilder(setup, shardings)
        self.writer = metrics_lib.MetricWriter(workdir, setup.total_steps or 0)
        self.last_train, self.last_eval, self.first_eval = {}, {}, {}
        self.window_start, self.window_steps = time.monotonic(), 0
        self.last_rollout, self.window_rollout_s = {}, 0.0
        self.profiling = False

    def save(self, step: int) -> None:
        state, run, task = self.state, self.setup.run, self.setup.task
        stage = task.stage(self.iterator.first)
        meta = {
            "step": step,
            "stage": stage,
            "seed": run.seed,
            "state_step": int(state.step),
            "skipped": int(state.skipped),
        }
        self.checkpointer.save(
            step,
            params=state.params,
            opt_state=state.opt_state,
            frozen=state.frozen,
            # The architecture the parameters continue with (a stage may raise the RoPE base),
            # so that a fine-tune or an export from this step uses the one they were trained at.
            model_config=task.model_config(self.setup.model_config, stage).to_hf_config(),
            meta=meta,
            data_state=self.iterator.get_state(),
        )

    def evaluate(self, step: int, stage: str) -> dict:
        if self.setup.task.eval_source is None:
            return {}
        state = self.state
        scalars, text = self.setup.task.evaluate(
            self.builder.model(state.params),
            state.frozen,
            self.setup.tokenizer,
            self.builder.eval_step(state.params, state.frozen),
            stage,
            self.builder.placement,
        )
        if scalars:
            self.writer.write(step, scalars, prefix="eval")
        if text:
            self.writer.text(step, "eval/samples", text)
        return scalars

    def lm_eval(self, step: int) -> None:
        scalars = in_loop.evaluate(
            self.setup.run.lm_eval,
            self.builder.model(self.state.params),
            os.path.join(self.workdir, model_io.TOKENIZER),
            self.builder.placement,
            self.workdir,
            step,
        )
        self.writer.write(step, scalars, prefix="lm_eval")

    def log(self, step: int, stage: str, step_metrics: dict, batch: dict) -> None:
        host = jax.device_get(self.setup.task.step_metrics(step_metrics))
        seconds = (time.monotonic() - self.window_start) / self.window_steps
        tokens_per_s = float(host["tokens"]) / seconds
        seq_len = max(np.shape(v)[-1] for v in batch.values() if np.ndim(v) == 2)
        flops = model_flops_per_token(self.builder.config, seq_len)
        self.last_train = {k: v for k, v in host.items() if k not in _UNLOGGED}
        self.last_train.update(
            {
                "step_time_s": seconds,
                "tokens_per_s": tokens_per_s,
                "mfu": metrics_lib.mfu(flops, tokens_per_s),
            }
        )
        if self.last_rollout:  # the last rollout's figures; the window's share spent in rollouts
            self.last_train.update(self.last_rollout)
            self.last_train["rollout/share_of_step"] = self.window_rollout_s / (
                seconds * self.window_steps
            )
        self.writer.write(step, self.last_train, label=f"stage={stage}")
        self.window_start, self.window_steps = time.monotonic(), 0
        self.window_rollout_s = 0.0

    def rollout(self, step: int, stage: str, batch: dict) -> dict:
        rows, metrics = self.setup.task.rollout(
            lambda: self.builder.model(self.state.params, stage),
            self.state.frozen,
            batch,
            step=step,
            seed=self.setup.run.seed,
            tokenizer=self.setup.tokenizer,
            placement=self.builder.placement,
        )
        if metrics:
            self.last_rollout = metrics
            self.window_rollout_s += metrics.get("rollout/seconds", 0.0)
        return rows

    def start_profile(self, step: int) -> None:
        profile_steps = self.setup.run.profile_steps
        if profile_steps and step == profile_steps[0]:
            jax.profiler.start_trace(os.path.join(self.workdir, "profile"))
            self.profiling = True

    def stop_profile(self, step: int) -> None:
        first, count = self.setup.run.profile_steps or (0, 0)
        if self.profiling and step >= first + count:
            jax.block_until_ready(self.state)
            jax.profiler.stop_trace()
            self.profiling = False

    def run(self, step: int) -> Result:
        setup, run, task = self.setup, self.setup.run, self.setup.task
        total_steps, stage = setup.total_steps, task.stage(self.iterator.first)
        first_step, preempted = step, False
        try:
            while total_steps is None or step < total_steps:
                if preemption.should_stop(step):
                    preempted = True
                    if step == first_step:
                        logging.warning("SIGTERM before the first step: nothing to save; exiting")
                        break
                    logging.warning("SIGTERM: saving step %d and exiting", step)
                    self.save(step)
                    break
                try:
                    batch = next(self.iterator)
                except StopIteration:
                    break
                batch = self.rollout(step, stage, batch)
                train_step = self.builder.for_batch(stage, batch)
                if run.eval_at_start and step == 0:
                    self.first_eval = self.evaluate(step, stage)
                self.start_profile(step)
                placed = self.builder.placement.from_local(batch)
                for _ in range(task.updates_per_batch):
                    self.state, step_metrics = train_step(self.state, placed)
                step += 1
                self.window_steps += 1
                self.stop_profile(step)
                if run.nan_policy == "stop" and bool(step_metrics["nonfinite"]):
                    raise NonFiniteError(
                        f"non-finite loss or gradients at step {step}; stopping "
                        f"(newest checkpoint: {self.checkpointer.latest_step()})"
                    )
                next_stage = task.stage(self.iterator.first)
                if step % run.log_every == 0 or step == total_steps or next_stage != stage:
                    self.log(step, stage, step_metrics, batch)
                if run.eval_every and step % run.eval_every == 0:
                    self.last_eval = self.evaluate(step, stage)
                if run.lm_eval and step % run.lm_eval.every_steps == 0:
                    self.lm_eval(step)
                self.checkpointer.check_for_errors()  # a failed async save, one step late at most
                if self.checkpointer.should_save(step):
                    self.save(step)
                stage = next_stage
            if step > first_step and not preempted:
                self.save(step)
                if not run.eval_every or step % run.eval_every:
                    self.last_eval = self.evaluate(step, stage)
                if run.lm_eval and step % run.lm_eval.every_steps:
                    self.lm_eval(step)
            # Records read and bad, per source and reason, over the whole run (resumes included).
            self.writer.write(step, self.iterator.bad_record_totals(), prefix="data")
        finally:
            if self.profiling:
                jax.profiler.stop_trace()
            self.writer.close()
        return Result(
            step=step,
            workdir=self.workdir,
            train=self.last_train,
            eval=self.last_eval,
            eval_at_start=self.first_eval,
        )
