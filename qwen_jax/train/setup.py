"""Everything a training run needs, resolved once before anything is written.

`RunConfig` is how the run goes (gin binds it as `setup.RunConfig`); `resolve` turns it, the
model preset and the mesh, runtime and optimizer into a `TrainSetup`: the architecture (the
initial checkpoint's, or the preset's; both must agree when both are given), the tokenizer
(`qwen_jax.train.run_tokenizer`, checked against the model) and the task's own checks. The loop
(`qwen_jax.train.loop.train`) takes a `TrainSetup` and reads no configuration.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import optax
from jax.sharding import Mesh

from qwen_jax.checkpoint import model_io
from qwen_jax.checkpoint.manager import CheckpointConfig
from qwen_jax.data.tokenizer import Tokenizer
from qwen_jax.eval.in_loop import LmEvalConfig
from qwen_jax.model.config import QwenConfig
from qwen_jax.model.layers import Runtime
from qwen_jax.parallel.logical import LogicalRules
from qwen_jax.train import run_tokenizer
from qwen_jax.train.step import NAN_POLICIES
from qwen_jax.train.tasks import Task


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """How a run goes."""

    task: Task  # pre-training, SFT or DPO (`qwen_jax.train.tasks`)
    # Batches to train; None: the task's own count (the sum of the pre-training stages) or until
    # the data ends (SFT/DPO epochs).
    total_steps: int | None = None
    seed: int = 0  # initialization and data order
    # A model checkpoint directory to start from (import_hf's output, or a step directory of
    # another run); the DPO reference defaults to it.
    init_from: str | None = None
    # A tokenizer.json (or its directory); default: the one `init_from` carries. A run from
    # scratch must name one.
    tokenizer_path: str | None = None
    checkpoint: CheckpointConfig | None = None  # when to save, what to keep (None: defaults)
    log_every: int = 10
    eval_every: int | None = None  # besides the evaluation after the last step
    eval_at_start: bool = False
    profile_steps: Sequence[int] = ()  # (first, count): a JAX trace into workdir/profile
    microbatches: int = 1  # gradient accumulation
    # 'skip': drop a non-finite update and count it; 'stop': stop, the last checkpoint is good.
    nan_policy: str = "skip"
    # Data shards (`qwen_jax.data.shards`); None: one per process. Batches are the same for every
    # process count that divides it, and a checkpoint restores onto any such count.
    data_shards: int | None = None
    # lm-eval tasks on the current parameters every N steps (`qwen_jax.eval.in_loop`).
    lm_eval: LmEvalConfig | None = None

    def __post_init__(self):
        if self.nan_policy not in NAN_POLICIES:
            raise ValueError(
                f"RunConfig.nan_policy={self.nan_policy!r}; choose one of {NAN_POLICIES}"
            )


@dataclasses.dataclass(frozen=True)
class TrainSetup:
    run: RunConfig
    model_config: QwenConfig  # the architecture before any stage changes it
    runtime: Runtime
    mesh: Mesh
    rules: LogicalRules
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    tokenizer: Tokenizer
    tokenizer_path: str

    @property
    def task(self) -> Task:
        return self.run.task

    @property
    def total_steps(self) -> int | None:
        return self.run.total_steps or self.run.task.total_steps

    @property
    def checkpoint(self) -> CheckpointConfig:
        return self.run.checkpoint or CheckpointConfig()


def model_config(preset: QwenConfig | None, init_from: str | None) -> QwenConfig:
    """The initial checkpoint's architecture, or the preset's; they must agree when both are
    given."""
    if init_from is None:
        if preset is None:
            raise ValueError(
                "no model: give a preset (--gin_file=configs/models/...) or an initial "
                "checkpoint (setup.RunConfig.init_from)"
            )
        return preset
    loaded = model_io.read_model_config(init_from)
    if preset is not None:
        bound, ours = preset.to_hf_config(), loaded.to_hf_config()
        diff = {k: (v, ours.get(k)) for k, v in bound.items() if ours.get(k) != v}
        if diff:
            raise ValueError(
                f"the model bound in gin differs from the initial checkpoint's "
                f"(field: (gin, checkpoint)): {diff}"
            )
    return loaded


def resolve(
    run: RunConfig,
    *,
    preset: QwenConfig | None,
    runtime: Runtime,
    mesh: Mesh,
    rules: LogicalRules,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
) -> TrainSetup:
    tokenizer_path = run_tokenizer.resolve(run.tokenizer_path, run.init_from)
    tokenizer = Tokenizer.from_file(tokenizer_path)
    config = model_config(preset, run.init_from)
    run_tokenizer.check(tokenizer, tokenizer_path, config, run.init_from)
    run.task.check(run.init_from, tokenizer)
    if run.lm_eval is not None:
        run.lm_eval.check()
    return TrainSetup(
        run, config, runtime, mesh, rules, optimizer, schedule, tokenizer, tokenizer_path
    )
