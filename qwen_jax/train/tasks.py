"""What differs between pre-training, SFT and DPO (and GRPO, `qwen_jax.train.grpo_task`): data,
loss, stages, evaluation, what runs before training and what builds a batch from the data. The
loop (`qwen_jax.train.loop`) knows a task only through the `Task` protocol.
"""

from __future__ import annotations

import functools
import itertools
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import jax
import numpy as np

from qwen_jax.data import examples, pipeline
from qwen_jax.data.chat import DEFAULT_SYSTEM_PROMPT
from qwen_jax.data.config import DataStage, Source
from qwen_jax.data.tokenizer import Tokenizer
from qwen_jax.model.config import QwenConfig
from qwen_jax.parallel import host_data
from qwen_jax.train import dpo, evaluation
from qwen_jax.train import reference as reference_lib
from qwen_jax.train.step import lm_loss_fn

# `loss_fn(model, batch, frozen) -> (loss_sum, aux)`: the train step's contract (qwen_jax.train.step).
LossFn = Callable[[Any, Mapping[str, jax.Array], Any], tuple[jax.Array, dict]]


class Task(Protocol):
    """The contract between a task and the training loop. The methods with a body are the
    defaults a task inherits by subclassing `Task`; the others every task defines.

    kind: recorded in the workdir's run.json ('pretrain', 'sft', 'dpo', 'grpo').
    loss_fn: the step's loss for a batch of `iterator`.
    total_steps: the task's own length (None: until the data ends or the run's total_steps).
    needs_frozen: whether the state carries frozen parameters beside the trained ones.
    finite_data: whether the training data ends (epochs); the processes of a run then agree
      on the step where it ends (`qwen_jax.data.shards`).
    updates_per_batch: optimizer updates on each batch `rollout` returns (GRPO's
      num_iterations); a loop step is one batch.
    """

    kind: str
    loss_fn: LossFn
    total_steps: int | None = None
    needs_frozen: bool = False
    finite_data: bool = False
    eval_source: Any = None  # the held-out data `evaluate` reads; None: no evaluation
    updates_per_batch: int = 1

    def iterator(
        self, tokenizer: Tokenizer, seed: int, *, shard_index: int, shard_count: int
    ) -> Iterator[dict]:
        """The resumable training batches of one data shard (its rows of each global batch): a
        `qwen_jax.data.pipeline` iterator (Grain `get_state`/`set_state`, and `bad_records`, the
        tallies of the records it read)."""
        ...

    def evaluate(
        self,
        model,
        frozen,
        tokenizer: Tokenizer,
        eval_step,
        stage: str,
        placement: host_data.Placement,
    ) -> tuple[dict, str | None]:
        """(scalars, text) on `eval_source`; `eval_step(rows) -> (loss_sum, aux)` on each
        process's rows of a global batch; `placement` places batches that every process holds
        whole (generation on a held-out set)."""
        ...

    def check(self, init_from: str | None, tokenizer: Tokenizer) -> None:
        """Refuses, before anything is written, a run this task cannot do from `init_from`
        with the run's `tokenizer`."""

    def prepare(
        self,
        workdir: str,
        tokenizer: Tokenizer,
        init_from: str | None,
        load_model,
        placement: host_data.Placement,
    ) -> bool:
        """Work before the first step, e.g. a pass of a frozen model over the data;
        `load_model(directory)` builds a checkpoint's model on the run's mesh. True when it
        changed what `iterator` yields (the loop then builds the iterator again)."""
        return False

    def initial_frozen(self, params, load_params: Callable[[str], Any]):
        """The frozen parameters a fresh run starts with (`needs_frozen`), given the initial
        trained ones; `load_params(directory)` reads a checkpoint's with the run's shardings."""
        return None

    def rollout(
        self,
        model: Callable[[], Any],
        frozen,
        batch: dict,
        *,
        step: int,
        seed: int,
        tokenizer: Tokenizer,
        placement: host_data.Placement,
    ) -> tuple[dict, dict]:
        """(the rows the step trains on, metrics to log with it), made from the iterator's
        `batch` at loop step `step`; `model()` builds the model with the current parameters
        (GRPO samples from it); a `rollout/seconds` metric is also logged as the share of step
        time spent in rollouts. Default: the batch itself, no metrics."""
        return batch, {}

    def stage(self, iterator) -> str:
        """The name of the stage the iterator's next batch belongs to."""
        return self.kind

    def model_config(self, config: QwenConfig, stage: str) -> QwenConfig:
        """The architecture for a stage (staged pre-training raises the RoPE base)."""
        return config

    def step_metrics(self, metrics: dict) -> dict:
        """A step's summed metrics as they are logged."""
        return metrics


def eval_pass(eval_step, batches, pair_metrics: Sequence[str] = ()) -> dict:
    """Loss (and per-pair metrics) over all batches, each normalized by the total weight; the
    step's sums are over the global batch, so across processes every process gets the totals."""
    totals: dict[str, float] = {}
    for batch in host_data.same_count(batches):
        loss_sum, aux = jax.device_get(eval_step(batch))
        totals["loss"] = totals.get("loss", 0.0) + float(loss_sum)
        for key in ("weight", *pair_metrics):
            totals[key] = totals.get(key, 0.0) + float(aux[key])
    weight = totals.pop("weight", 0.0)
    if not weight:
        raise ValueError("the eval split produced no examples")
    return {key: value / weight for key, value in totals.items()}


class PretrainTask(Task):
    """Staged pre-training. `rope_theta` maps a stage name to its RoPE base (stages not named
    keep the model config's); the optimizer state carries across stages."""

    kind = "pretrain"

    def __init__(
        self,
        sources: Sequence[Source],
        stages: Sequence[DataStage],
        rope_theta: Mapping[str, float] | None = None,
        eval_source: Source | str | None = None,
        eval_batch_size: int = 8,
        packing: str = "first_fit",
        worker_count: int = 0,
        z_loss: float = 0.0,
    ):
        self.sources, self.stages = list(sources), list(stages)
        self.rope_theta = dict(rope_theta or {})
        unknown = sorted(set(self.rope_theta) - {s.name for s in self.stages})
        if unknown:
            raise ValueError(f"PretrainTask.rope_theta names unknown stages {unknown}")
        self.eval_source, self.eval_batch_size = eval_source, eval_batch_size
        self.packing, self.worker_count = packing, worker_count
        self.loss_fn = functools.partial(lm_loss_fn, z_loss=z_loss)

    @property
    def total_steps(self) -> int | None:
        steps = [s.steps for s in self.stages]
        return None if None in steps else sum(steps)

    def iterator(self, tokenizer, seed: int, *, shard_index: int, shard_count: int):
        return pipeline.pretrain_iterator(
            self.sources,
            self.stages,
            tokenizer,
            seed=seed,
            shard_index=shard_index,
            shard_count=shard_count,
            packing=self.packing,
            worker_count=self.worker_count,
        )

    def stage(self, iterator) -> str:
        return iterator.stage.name

    def seq_len(self, stage: str) -> int:
        return next(s.seq_len for s in self.stages if s.name == stage)

    def model_config(self, config: QwenConfig, stage: str) -> QwenConfig:
        theta = self.rope_theta.get(stage)
        if theta is None:
            return config
        return config.replace(
            rope_theta=float(theta),
            max_position_embeddings=max(config.max_position_embeddings, self.seq_len(stage)),
        )

    def evaluate(self, model, frozen, tokenizer, eval_step, stage: str, placement):
        batches = pipeline.pretrain_eval_iterator(
            self.eval_source,
            tokenizer,
            seq_len=self.seq_len(stage),
            batch_size=self.eval_batch_size,
        )
        return eval_pass(eval_step, batches), None


class SFTTask(Task):
    """Supervised fine-tuning on chat records, loss on assistant turns only (the data pipeline's
    loss mask). Evaluation: loss on the held-out split, exact match of greedy answers, samples."""

    kind = "sft"

    def __init__(
        self,
        sources,
        seq_len: int,
        batch_size: int,
        num_epochs: int | None = 2,
        eval_source=None,
        eval_batch_size: int = 8,
        exact_match_examples: int = 100,
        num_samples: int = 3,
        max_new_tokens: int = 16,
        system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
        worker_count: int = 0,
        z_loss: float = 0.0,
    ):
        self.sources, self.seq_len, self.batch_size = sources, seq_len, batch_size
        self.num_epochs, self.finite_data = num_epochs, num_epochs is not None
        self.eval_source, self.eval_batch_size = eval_source, eval_batch_size
        self.exact_match_examples, self.num_samples = exact_match_examples, num_samples
        self.max_new_tokens, self.system_prompt = max_new_tokens, system_prompt
        self.worker_count = worker_count
        self.loss_fn = functools.partial(lm_loss_fn, z_loss=z_loss)

    def _batches(self, source, tokenizer, batch_size: int, **reading):
        return pipeline.sft_iterator(
            source,
            tokenizer,
            seq_len=self.seq_len,
            batch_size=batch_size,
            system_prompt=self.system_prompt,
            **reading,
        )

    def iterator(self, tokenizer, seed: int, *, shard_index: int, shard_count: int):
        return self._batches(
            self.sources,
            tokenizer,
            self.batch_size,
            seed=seed,
            shard_index=shard_index,
            shard_count=shard_count,
            num_epochs=self.num_epochs,
            worker_count=self.worker_count,
        )

    def exact_match(self, model, tokenizer, placement) -> tuple[float, list]:
        examples = list(
            pipeline.generation_eval_examples(
                self.eval_source,
                tokenizer,
                system_prompt=self.system_prompt,
                limit=self.exact_match_examples,
            )
        )
        answers = evaluation.greedy_answers(
            model,
            tokenizer,
            [e["prompt_ids"] for e in examples],
            placement=placement,
            max_new_tokens=self.max_new_tokens,
        )
        hits = [a == e["answer"].strip() for a, e in zip(answers, examples)]
        samples = [
            (tokenizer.decode(e["prompt_ids"]), e["answer"], a) for e, a in zip(examples, answers)
        ]
        return float(np.mean(hits)), samples

    def evaluate(self, model, frozen, tokenizer, eval_step, stage: str, placement):
        batches = self._batches(self.eval_source, tokenizer, self.eval_batch_size, for_eval=True)
        scalars = eval_pass(eval_step, batches)
        scalars["exact_match"], samples = self.exact_match(model, tokenizer, placement)
        text = "\n".join(
            f"--- prompt: {p!r}\n    expected: {e!r}\n    got: {g!r}"
            for p, e, g in samples[: self.num_samples]
        )
        return scalars, text


class PairTask(Task):
    """The data side of the tasks trained on preference pairs (DPO, reward models): each row
    holds one sequence of the pair, the prompt's last `prompt_len` tokens (default: half of
    seq_len), then the response's first `seq_len - prompt_len` (TRL's max_prompt_length and
    max_length)."""

    def _set_pairs(
        self,
        source,
        seq_len: int,
        batch_size: int,
        prompt_len: int | None,
        num_epochs: int | None,
        eval_source,
        eval_batch_size: int,
        system_prompt: str | None,
        worker_count: int,
    ) -> None:
        prompt_len = seq_len // 2 if prompt_len is None else prompt_len
        if not 0 < prompt_len < seq_len:
            raise ValueError(
                f"{type(self).__name__}: prompt_len {prompt_len} must be in (0, seq_len {seq_len})"
            )
        self.source, self.prompt_len, self.response_len = source, prompt_len, seq_len - prompt_len
        self.batch_size, self.num_epochs = batch_size, num_epochs
        self.finite_data = num_epochs is not None
        self.eval_source, self.eval_batch_size = eval_source, eval_batch_size
        self.system_prompt, self.worker_count = system_prompt, worker_count

    def _row_options(self) -> dict:
        """Further arguments of `pipeline.dpo_iterator` for this task's rows."""
        return {}

    def _pairs(self, source, tokenizer, **kwargs):
        return pipeline.dpo_iterator(
            source,
            tokenizer,
            prompt_len=self.prompt_len,
            response_len=self.response_len,
            system_prompt=self.system_prompt,
            **self._row_options(),
            **kwargs,
        )

    def iterator(self, tokenizer, seed: int, *, shard_index: int, shard_count: int):
        return self._pairs(
            self.source,
            tokenizer,
            batch_size=self.batch_size,
            seed=seed,
            shard_index=shard_index,
            shard_count=shard_count,
            num_epochs=self.num_epochs,
            worker_count=self.worker_count,
        )


class DPOTask(PairTask):
    """DPO on preference pairs against a frozen reference (by default the starting weights; the
    loop loads `reference` when it names another checkpoint).

    seq_len: tokens of each sequence (prompt + response); prompt_len: the most prompt tokens
      kept, from the right (default: half of seq_len); responses are cut to the rest.
    precompute_reference: compute the reference log-probs of every train and eval pair in one
      pass before training (`qwen_jax.train.reference`) instead of in each step, so no frozen
      copy of the model stays on the devices; the table is kept in the workdir for resumes.
    """

    kind = "dpo"

    def __init__(
        self,
        source,
        seq_len: int,
        batch_size: int,
        prompt_len: int | None = None,
        num_epochs: int | None = 1,
        config: dpo.DPOConfig | None = None,
        reference: str | None = None,
        precompute_reference: bool = False,
        eval_source=None,
        eval_batch_size: int = 16,
        max_new_tokens: int = 16,
        system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
        chunk_size: int = 2048,
        worker_count: int = 0,
    ):
        self._set_pairs(
            source,
            seq_len,
            batch_size,
            prompt_len,
            num_epochs,
            eval_source,
            eval_batch_size,
            system_prompt,
            worker_count,
        )
        self.config = config or dpo.DPOConfig()
        self.reference, self.precompute_reference = reference, precompute_reference
        self.max_new_tokens, self.chunk_size = max_new_tokens, chunk_size
        self.loss_fn = dpo.make_dpo_loss_fn(self.config, chunk_size=chunk_size)
        self.reference_logps = None
        self.needs_frozen = not precompute_reference

    def _to_example(self, tokenizer):
        return examples.PreferenceToExample(
            tokenizer, self.prompt_len, self.response_len, self.system_prompt
        )

    def _reference_dir(self, init_from: str | None) -> str:
        reference = self.reference or init_from
        if reference is None:
            raise ValueError(
                "DPOTask.precompute_reference needs the reference's weights: set "
                "loop.RunConfig.init_from or DPOTask.reference"
            )
        return reference

    def check(self, init_from: str | None, tokenizer: Tokenizer) -> None:
        if self.precompute_reference:
            self._reference_dir(init_from)

    def prepare(self, workdir, tokenizer, init_from, load_model, placement) -> bool:
        """With `precompute_reference`: reads this run's table from the workdir, or computes it
        with the reference model and writes it there (process 0); the rows then carry it."""
        if not self.precompute_reference:
            return False
        path = os.path.join(workdir, reference_lib.TABLE_FILE)
        if os.path.exists(path):
            self.reference_logps = reference_lib.load_table(path)
            return True
        sources = [self.source] + ([self.eval_source] if self.eval_source is not None else [])
        table = reference_lib.compute_table(
            load_model(self._reference_dir(init_from)),
            itertools.chain.from_iterable(map(pipeline.preference_documents, sources)),
            self._to_example(tokenizer),
            placement=placement,
            batch_size=self.eval_batch_size,
            chunk_size=self.chunk_size,
        )
        if jax.process_index() == 0:
            reference_lib.save_table(path, table)
        self.reference_logps = table
        return True

    def initial_frozen(self, params, load_params):
        if not self.needs_frozen:
            return None
        return load_params(self.reference) if self.reference else params

    def _row_options(self) -> dict:
        return {"reference_logps": self.reference_logps}

    def step_metrics(self, metrics: dict) -> dict:
        return dpo.pair_means(metrics)

    def evaluate(self, model, frozen, tokenizer, eval_step, stage: str, placement):
        batches = self._pairs(
            self.eval_source, tokenizer, batch_size=self.eval_batch_size, for_eval=True
        )
        scalars = eval_pass(eval_step, batches, dpo.PAIR_METRICS)
        records = list(pipeline.preference_documents(self.eval_source))
        scalars.update(
            evaluation.preference_figures(
                model,
                tokenizer,
                records,
                system_prompt=self.system_prompt,
                placement=placement,
                max_new_tokens=self.max_new_tokens,
            )
        )
        return scalars, None
