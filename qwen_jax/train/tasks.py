"""What differs between pre-training, SFT and DPO: data, loss, stages and evaluation.

The loop (`qwen_jax.train.loop`) is the same for all three; a task supplies
  kind                     'pretrain' | 'sft' | 'dpo' (recorded in the workdir)
  needs_frozen             whether the state carries frozen parameters (the DPO reference)
  prepare_reference(...)   (DPO with precompute_reference) the reference log-probs table
  iterator(tok, seed)      the resumable training batch iterator
  stage(iterator)          the name of the stage of the next batch
  model_config(cfg, stage) the architecture for a stage (staged pre-training raises RoPE theta)
  loss_fn                  `loss_fn(model, batch, frozen) -> (loss_sum, aux)` for the step
  step_metrics(m)          the step's summed metrics turned into what is logged
  evaluate(model, frozen, tok, eval_step) -> (scalars, text)  on held-out data
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import gin
import jax
import numpy as np

from qwen_jax.data import examples, pipeline
from qwen_jax.data.chat import DEFAULT_SYSTEM_PROMPT
from qwen_jax.data.config import DataStage, Source
from qwen_jax.model.config import QwenConfig
from qwen_jax.train import dpo, evaluation
from qwen_jax.train import reference as reference_lib
from qwen_jax.train.step import lm_loss_fn


def eval_pass(eval_step, batches, pair_metrics: Sequence[str] = ()) -> dict:
    """Loss (and per-pair metrics) over all batches, each normalized by the total weight."""
    totals: dict[str, float] = {}
    for batch in batches:
        loss_sum, aux = jax.device_get(eval_step(batch))
        totals["loss"] = totals.get("loss", 0.0) + float(loss_sum)
        for key in ("weight", *pair_metrics):
            totals[key] = totals.get(key, 0.0) + float(aux[key])
    weight = totals.pop("weight", 0.0)
    if not weight:
        raise ValueError("the eval split produced no examples")
    return {key: value / weight for key, value in totals.items()}


@gin.configurable
class PretrainTask:
    """Staged pre-training. `rope_theta` maps a stage name to its RoPE base (stages not named
    keep the model config's); the optimizer state carries across stages."""

    kind = "pretrain"
    needs_frozen = False

    def __init__(
        self,
        sources: Sequence[Source] = gin.REQUIRED,
        stages: Sequence[DataStage] = gin.REQUIRED,
        rope_theta: Mapping[str, float] | None = None,
        eval_source: Source | str | None = None,
        eval_batch_size: int = 8,
        packing: str = "first_fit",
        worker_count: int = 0,
    ):
        self.sources, self.stages = list(sources), list(stages)
        self.rope_theta = dict(rope_theta or {})
        unknown = sorted(set(self.rope_theta) - {s.name for s in self.stages})
        if unknown:
            raise ValueError(f"PretrainTask.rope_theta names unknown stages {unknown}")
        self.eval_source, self.eval_batch_size = eval_source, eval_batch_size
        self.packing, self.worker_count = packing, worker_count
        self.loss_fn = lm_loss_fn

    @property
    def total_steps(self) -> int | None:
        steps = [s.steps for s in self.stages]
        return None if None in steps else sum(steps)

    def iterator(self, tokenizer, seed: int):
        return pipeline.pretrain_iterator(
            self.sources,
            self.stages,
            tokenizer,
            seed=seed,
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

    def step_metrics(self, metrics: dict) -> dict:
        return metrics

    def evaluate(self, model, frozen, tokenizer, eval_step, stage: str):
        if self.eval_source is None:
            return {}, None
        batches = pipeline.pretrain_eval_iterator(
            self.eval_source,
            tokenizer,
            seq_len=self.seq_len(stage),
            batch_size=self.eval_batch_size,
        )
        return eval_pass(eval_step, batches), None


@gin.configurable
class SFTTask:
    """Supervised fine-tuning on chat records, loss on assistant turns only (the data pipeline's
    loss mask). Evaluation: loss on the held-out split, exact match of greedy answers, samples."""

    kind = "sft"
    needs_frozen = False

    def __init__(
        self,
        sources=gin.REQUIRED,
        seq_len: int = gin.REQUIRED,
        batch_size: int = gin.REQUIRED,
        num_epochs: int | None = 2,
        eval_source=None,
        eval_batch_size: int = 8,
        exact_match_examples: int = 100,
        num_samples: int = 3,
        max_new_tokens: int = 16,
        system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
        worker_count: int = 0,
    ):
        self.sources, self.seq_len, self.batch_size = sources, seq_len, batch_size
        self.num_epochs = num_epochs
        self.eval_source, self.eval_batch_size = eval_source, eval_batch_size
        self.exact_match_examples, self.num_samples = exact_match_examples, num_samples
        self.max_new_tokens, self.system_prompt = max_new_tokens, system_prompt
        self.worker_count = worker_count
        self.loss_fn = lm_loss_fn

    total_steps = None

    def iterator(self, tokenizer, seed: int):
        return pipeline.sft_iterator(
            self.sources,
            tokenizer,
            seq_len=self.seq_len,
            batch_size=self.batch_size,
            seed=seed,
            num_epochs=self.num_epochs,
            system_prompt=self.system_prompt,
            worker_count=self.worker_count,
        )

    def stage(self, iterator) -> str:
        return "sft"

    def model_config(self, config: QwenConfig, stage: str) -> QwenConfig:
        return config

    def step_metrics(self, metrics: dict) -> dict:
        return metrics

    def exact_match(self, model, tokenizer) -> tuple[float, list]:
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
            max_new_tokens=self.max_new_tokens,
        )
        hits = [a == e["answer"].strip() for a, e in zip(answers, examples)]
        samples = [
            (tokenizer.decode(e["prompt_ids"]), e["answer"], a) for e, a in zip(examples, answers)
        ]
        return float(np.mean(hits)), samples

    def evaluate(self, model, frozen, tokenizer, eval_step, stage: str):
        if self.eval_source is None:
            return {}, None
        batches = pipeline.sft_iterator(
            self.eval_source,
            tokenizer,
            seq_len=self.seq_len,
            batch_size=self.eval_batch_size,
            for_eval=True,
            system_prompt=self.system_prompt,
        )
        scalars = eval_pass(eval_step, batches)
        scalars["exact_match"], samples = self.exact_match(model, tokenizer)
        text = "\n".join(
            f"--- prompt: {p!r}\n    expected: {e!r}\n    got: {g!r}"
            for p, e, g in samples[: self.num_samples]
        )
        return scalars, text


@gin.configurable
class DPOTask:
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
        source=gin.REQUIRED,
        seq_len: int = gin.REQUIRED,
        batch_size: int = gin.REQUIRED,
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
        prompt_len = seq_len // 2 if prompt_len is None else prompt_len
        if not 0 < prompt_len < seq_len:
            raise ValueError(f"DPOTask: prompt_len {prompt_len} must be in (0, seq_len {seq_len})")
        # A row holds one sequence of the pair: the prompt's last `prompt_len` tokens, then the
        # response's first `seq_len - prompt_len` (TRL's max_prompt_length and max_length).
        self.source, self.prompt_len, self.response_len = source, prompt_len, seq_len - prompt_len
        self.batch_size, self.num_epochs = batch_size, num_epochs
        self.config = config or dpo.DPOConfig()
        self.reference, self.precompute_reference = reference, precompute_reference
        self.eval_source, self.eval_batch_size = eval_source, eval_batch_size
        self.max_new_tokens, self.system_prompt = max_new_tokens, system_prompt
        self.worker_count, self.chunk_size = worker_count, chunk_size
        self.loss_fn = dpo.make_dpo_loss_fn(self.config, chunk_size=chunk_size)
        self.reference_logps = None

    total_steps = None

    @property
    def needs_frozen(self) -> bool:
        return not self.precompute_reference

    def _to_example(self, tokenizer):
        return examples.PreferenceToExample(
            tokenizer, self.prompt_len, self.response_len, self.system_prompt
        )

    def prepare_reference(self, workdir: str, tokenizer, load_reference_model) -> None:
        """With `precompute_reference`: reads this run's table from the workdir, or computes it
        with `load_reference_model()` and writes it there (process 0)."""
        path = os.path.join(workdir, reference_lib.TABLE_FILE)
        if os.path.exists(path):
            self.reference_logps = reference_lib.load_table(path)
            return
        sources = [self.source] + ([self.eval_source] if self.eval_source is not None else [])
        table = reference_lib.compute_table(
            load_reference_model(),
            sources,
            self._to_example(tokenizer),
            batch_size=self.eval_batch_size,
            chunk_size=self.chunk_size,
        )
        if jax.process_index() == 0:
            reference_lib.save_table(path, table)
        self.reference_logps = table

    def _pairs(self, source, tokenizer, **kwargs):
        return pipeline.dpo_iterator(
            source,
            tokenizer,
            prompt_len=self.prompt_len,
            response_len=self.response_len,
            system_prompt=self.system_prompt,
            reference_logps=self.reference_logps,
            **kwargs,
        )

    def iterator(self, tokenizer, seed: int):
        return self._pairs(
            self.source,
            tokenizer,
            batch_size=self.batch_size,
            seed=seed,
            num_epochs=self.num_epochs,
            worker_count=self.worker_count,
        )

    def stage(self, iterator) -> str:
        return "dpo"

    def model_config(self, config: QwenConfig, stage: str) -> QwenConfig:
        return config

    def step_metrics(self, metrics: dict) -> dict:
        return dpo.pair_means(metrics)

    def evaluate(self, model, frozen, tokenizer, eval_step, stage: str):
        if self.eval_source is None:
            return {}, None
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
                max_new_tokens=self.max_new_tokens,
            )
        )
        return scalars, None
