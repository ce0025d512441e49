"""GRPO as a task of the one training loop: each step samples G completions per prompt with the
KV-cache decoder from the parameters being trained, on the same mesh (no second engine, no
weight copy), scores them with the reward functions, and trains on them (`qwen_jax.train.grpo`).

    prompts (Grain, resumable) -> rollout: sample (rng = fold_in(seed, step)), decode, reward,
    group advantages, old / reference log-probs -> `updates_per_batch` train steps on the rows

The sampling key is a function of the run's seed and the step, so a resumed run draws the same
completions as an uninterrupted one without storing a generator state.
"""

from __future__ import annotations

import functools
import itertools
import json
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from qwen_jax.data import pipeline
from qwen_jax.data.chat import DEFAULT_SYSTEM_PROMPT
from qwen_jax.data.examples import PromptToExample
from qwen_jax.data.tokenizer import Tokenizer
from qwen_jax.model.generate import Sampling, generate
from qwen_jax.train import evaluation, grpo, rewards
from qwen_jax.train.tasks import Task

# The keyword arguments TRL gives every reward function besides the record's fields.
_RESERVED = ("prompts", "completions", "completion_ids")


def completion_rows(
    prompt_ids: np.ndarray, prompt_mask: np.ndarray, tokens: np.ndarray, lengths: np.ndarray, pad_id
) -> dict[str, np.ndarray]:
    """Training rows [N, P + M] from left-padded prompts [N, P] and completions [N, M] of the
    given lengths: `inputs`/`targets` (prompt + completion + one pad, shifted), `positions` and
    `segment_ids` as the decoder saw them (padding: segment 0), and `completion_mask` over the
    targets that are completion tokens (the stop token included, as TRL's mask has it)."""
    n, p = prompt_ids.shape
    completion = np.arange(tokens.shape[1])[None, :] < lengths[:, None]
    tail = np.zeros((n, 1), bool)
    seq = np.concatenate(
        [prompt_ids, np.where(completion, tokens, pad_id), np.full((n, 1), pad_id)], axis=1
    ).astype(np.int32)
    real = np.concatenate([prompt_mask.astype(bool), completion, tail], axis=1)
    positions = (np.maximum(np.cumsum(real, axis=1) - 1, 0) * real).astype(np.int32)
    is_completion = np.concatenate([np.zeros((n, p), bool), completion, tail], axis=1)
    return {
        "inputs": seq[:, :-1],
        "targets": seq[:, 1:],
        "positions": positions[:, :-1],
        "segment_ids": real[:, :-1].astype(np.int32),
        "completion_mask": is_completion[:, 1:].astype(np.float32),
    }


def _everyone(local: np.ndarray) -> np.ndarray:
    """Every process's rows of `local`, in process order (the rows of the global batch)."""
    if jax.process_count() == 1:
        return local
    gathered = np.asarray(multihost_utils.process_allgather(local))
    return gathered.reshape(-1, *local.shape[1:])


@functools.partial(nnx.jit, static_argnames=("temperature", "chunk_size"))
def _completion_logps(model, rows, *, temperature, chunk_size):
    logps, _ = grpo.completion_logprobs(model, rows, temperature=temperature, chunk_size=chunk_size)
    return logps


def _with_params(model, params):
    """`model`'s architecture with other parameters (a pure dict), leaving `model` untouched."""
    graphdef, state = nnx.split(model)
    state = jax.tree.map(lambda x: x, state)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


class GRPOTask(Task):
    """Online RL with group-relative advantages on prompt records (TRL's prompt-only format:
    `prompt` as a string or messages, plus the fields the reward functions read).

    batch_size: prompts per step, all hosts together (each gives `config.num_generations` rows).
    max_prompt_len: prompt tokens kept (from the right); max_new_tokens: the completion budget
      (also dr_grpo's normalizer, TRL's `max_completion_length`).
    reward_functions / reward_weights: callables (`qwen_jax.train.rewards`) and their weights
      (default 1 each); the reward is the weighted sum.
    sampling: temperature (> 0), top-k, top-p of the rollouts; stop_tokens: default
      `<|im_end|>` and `<|endoftext|>`.
    reference: the frozen reference's checkpoint when `config.beta` > 0 (default: the starting
      weights).
    eval_source / eval_examples: held-out prompts whose greedy completions are scored by the
      same reward functions (`eval/reward`, `eval/rewards/<name>`).
    """

    kind = "grpo"

    def __init__(
        self,
        source,
        reward_functions: Sequence[Callable],
        batch_size: int,
        max_prompt_len: int,
        max_new_tokens: int,
        config: grpo.GRPOConfig | None = None,
        sampling: Sampling | None = None,
        reward_weights: Sequence[float] | None = None,
        stop_tokens: Sequence[int] | None = None,
        reference: str | None = None,
        eval_source=None,
        eval_examples: int = 100,
        num_epochs: int | None = None,
        system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
        chunk_size: int = 1024,
        worker_count: int = 0,
        num_samples: int = 3,
    ):
        self.config = config or grpo.GRPOConfig()
        self.sampling = sampling or Sampling(temperature=1.0)
        if self.sampling.temperature <= 0:
            raise ValueError(
                "GRPOTask.sampling.temperature must be > 0: greedy completions of a prompt are "
                "all the same, so a group has nothing to compare"
            )
        self.reward_functions = list(reward_functions)
        if not self.reward_functions:
            raise ValueError("GRPOTask.reward_functions is empty: give at least one")
        self.reward_names = [rewards.name_of(fn) for fn in self.reward_functions]
        if len(set(self.reward_names)) != len(self.reward_names):
            raise ValueError(f"GRPOTask: reward function names repeat: {self.reward_names}")
        weights = [1.0] * len(self.reward_functions) if reward_weights is None else reward_weights
        if len(weights) != len(self.reward_functions):
            raise ValueError(
                f"GRPOTask: {len(weights)} reward_weights for {len(self.reward_functions)} "
                f"reward functions"
            )
        self.reward_weights = np.asarray(weights, np.float64)
        if max_prompt_len <= 0 or max_new_tokens <= 0:
            raise ValueError("GRPOTask: max_prompt_len and max_new_tokens must be positive")
        row = max_prompt_len + max_new_tokens
        if row > chunk_size and row % chunk_size:
            raise ValueError(
                f"GRPOTask: rows of max_prompt_len + max_new_tokens = {row} tokens do not split "
                f"into loss chunks of chunk_size {chunk_size}"
            )
        self.source, self.batch_size = source, batch_size
        self.max_prompt_len, self.max_new_tokens = max_prompt_len, max_new_tokens
        self.stop_tokens, self.reference = stop_tokens, reference
        self.eval_source, self.eval_examples = eval_source, eval_examples
        self.num_epochs, self.system_prompt = num_epochs, system_prompt
        self.chunk_size, self.worker_count, self.num_samples = chunk_size, worker_count, num_samples
        self.needs_frozen = self.config.beta > 0
        self.updates_per_batch = self.config.num_iterations
        self.loss_fn = grpo.make_grpo_loss_fn(
            self.config,
            max_completion_length=max_new_tokens,
            temperature=self.sampling.temperature,
            chunk_size=chunk_size,
        )

    @property
    def required_fields(self) -> dict[str, str]:
        """{record field: the reward function that reads it}."""
        return {
            field: f"reward function {name!r}"
            for fn, name in zip(self.reward_functions, self.reward_names)
            for field in getattr(fn, "fields", ())
        }

    def _stops(self, tokenizer: Tokenizer) -> tuple[int, ...]:
        if self.stop_tokens:
            return tuple(int(t) for t in self.stop_tokens)
        return (tokenizer.im_end_id, tokenizer.eos_id)

    def iterator(self, tokenizer, seed: int, *, shard_index: int, shard_count: int):
        return pipeline.prompt_iterator(
            self.source,
            tokenizer,
            max_prompt_len=self.max_prompt_len,
            batch_size=self.batch_size,
            seed=seed,
            num_epochs=self.num_epochs,
            system_prompt=self.system_prompt,
            required=self.required_fields,
            shard_index=shard_index,
            shard_count=shard_count,
            worker_count=self.worker_count,
        )

    def check(self, init_from, tokenizer) -> None:
        for fn in self.reward_functions:
            if hasattr(fn, "check"):  # a reward model: its checkpoint, before anything is written
                fn.check(tokenizer)

    def prepare(self, workdir, tokenizer, init_from, load_model, placement) -> bool:
        """Loads the reward functions that score with a model (`reward_model.RewardModelScore`)
        onto the run's mesh."""
        for fn in self.reward_functions:
            if hasattr(fn, "attach"):
                fn.attach(
                    tokenizer,
                    system_prompt=self.system_prompt,
                    max_prompt_len=self.max_prompt_len,
                    # The completion's text, then `<|im_end|>\n`.
                    max_length=self.max_prompt_len + self.max_new_tokens + 2,
                    load_model=load_model,
                    placement=placement,
                )
        return False

    def initial_frozen(self, params, load_params):
        if not self.needs_frozen:
            return None
        return load_params(self.reference) if self.reference else params

    def score(self, records: Sequence[dict], texts: Sequence[str], ids: Sequence) -> np.ndarray:
        """[N, F] rewards of completions `texts` (token ids `ids`) of prompt `records`; NaN
        where a function returned None."""
        prompts = [r["prompt"] for r in records]
        completions = [
            t if isinstance(p, str) else [{"role": "assistant", "content": t}]
            for p, t in zip(prompts, texts)
        ]
        keys = sorted({k for r in records for k in r["fields"]} - set(_RESERVED))
        fields = {k: [r["fields"].get(k) for r in records] for k in keys}
        out = np.full((len(records), len(self.reward_functions)), np.nan)
        for j, (fn, name) in enumerate(zip(self.reward_functions, self.reward_names)):
            values = fn(prompts=prompts, completions=completions, completion_ids=ids, **fields)
            if not isinstance(values, (list, tuple, np.ndarray)) or len(values) != len(records):
                raise ValueError(
                    f"reward function {name!r} returned {type(values).__name__} "
                    f"{'of length ' + str(len(values)) if hasattr(values, '__len__') else ''}; "
                    f"expected a list of {len(records)} numbers (or None)"
                )
            for i, v in enumerate(values):
                if v is None:
                    continue
                if isinstance(v, bool) or not isinstance(v, (int, float, np.number)):
                    raise ValueError(
                        f"reward function {name!r} returned {v!r} for {records[i]['loc']}; "
                        f"expected a number or None"
                    )
                out[i, j] = float(v)
        return out

    def rollout(self, model, frozen, batch, *, step, seed, tokenizer, placement):
        """Samples, scores and builds the rows of one generation batch (see the module doc);
        metrics as TRL names them, plus `rollout/seconds` (all of it), `rollout/generate_s`
        and `rollout/tokens_per_s` (generated tokens per second of sampling)."""
        config, group = self.config, self.config.num_generations
        policy = model()
        # The previous step's update must finish first; waiting here keeps it out of the timings.
        jax.block_until_ready(nnx.state(policy))
        rollout_start = time.monotonic()
        prompt_ids = np.repeat(batch["prompt_ids"], group, axis=0)
        prompt_mask = np.repeat(batch["prompt_mask"], group, axis=0)
        records = [json.loads(str(r)) for r in np.repeat(batch["record"], group)]
        stops = self._stops(tokenizer)

        start = time.monotonic()
        placed = placement.from_local({"ids": prompt_ids, "mask": prompt_mask}, split_length=False)
        tokens, lengths = generate(
            policy,
            placed["ids"],
            placed["mask"],
            max_new_tokens=self.max_new_tokens,
            stop_tokens=stops,
            sampling=self.sampling,
            rng=jax.random.fold_in(jax.random.key(seed), step),
            pad_id=tokenizer.pad_id,
        )
        tokens, lengths = placement.to_local(tokens), placement.to_local(lengths)
        generate_s = time.monotonic() - start

        ids = [[int(t) for t in row[:n] if t not in stops] for row, n in zip(tokens, lengths)]
        texts = [tokenizer.decode(row, skip_special_tokens=True) for row in ids]
        per_function = self.score(
            records, texts, [list(row[:n]) for row, n in zip(tokens, lengths)]
        )
        # A row's length counts up to its first stop token, so it ended iff its last one is a stop.
        terminated = np.isin(tokens[np.arange(len(tokens)), lengths - 1], stops)
        # A process's rows are its groups; batch scaling and the logged figures need them all.
        all_per_function, all_lengths, all_terminated = (
            _everyone(x) for x in (per_function, lengths, terminated)
        )
        advantages, stats = grpo.advantages(
            grpo.combine_rewards(all_per_function, self.reward_weights), config
        )
        first = jax.process_index() * len(per_function)
        rows = completion_rows(prompt_ids, prompt_mask, tokens, lengths, tokenizer.pad_id)
        rows["advantages"] = advantages[first : first + len(per_function)]
        if config.num_iterations > 1:
            rows["old_logps"] = self._logps(policy, rows, placement)
        if config.beta:
            rows["ref_logps"] = self._logps(_with_params(policy, frozen), rows, placement)

        metrics = {
            **stats,
            "completions/mean_length": float(all_lengths.mean()),
            "completions/min_length": float(all_lengths.min()),
            "completions/max_length": float(all_lengths.max()),
            "completions/clipped_ratio": float(1.0 - all_terminated.mean()),
            "rollout/seconds": time.monotonic() - rollout_start,
            "rollout/generate_s": generate_s,
            "rollout/tokens_per_s": float(all_lengths.sum()) / max(generate_s, 1e-9),
        }
        for j, name in enumerate(self.reward_names):
            column = all_per_function[:, j]
            applied = column[~np.isnan(column)]
            metrics[f"rewards/{name}/mean"] = float(applied.mean()) if applied.size else 0.0
            metrics[f"rewards/{name}/std"] = float(applied.std(ddof=1)) if applied.size > 1 else 0.0
        return rows, metrics

    def _logps(self, model, rows, placement) -> np.ndarray:
        keys = ("inputs", "targets", "positions", "segment_ids")
        placed = placement.from_local({k: rows[k] for k in keys})
        logps = _completion_logps(
            model, placed, temperature=self.sampling.temperature, chunk_size=self.chunk_size
        )
        return placement.to_local(logps)

    def step_metrics(self, metrics: dict) -> dict:
        return grpo.step_means(metrics)

    def evaluate(self, model, frozen, tokenizer, eval_step, stage: str, placement):
        """Greedy completions of the held-out prompts, scored by the reward functions."""
        to_example = PromptToExample(tokenizer, self.max_prompt_len, self.system_prompt)
        docs = list(
            itertools.islice(pipeline.prompt_documents(self.eval_source), self.eval_examples)
        )
        prompts = []
        for doc in docs:
            row = to_example(doc)
            prompts.append(row["prompt_ids"][row["prompt_mask"] == 1])
        texts = evaluation.greedy_answers(
            model, tokenizer, prompts, placement=placement, max_new_tokens=self.max_new_tokens
        )
        per_function = self.score(docs, texts, [tokenizer.encode(t) for t in texts])
        scalars = {"reward": float(grpo.combine_rewards(per_function, self.reward_weights).mean())}
        for j, name in enumerate(self.reward_names):
            scalars[f"rewards/{name}"] = float(np.nanmean(per_function[:, j]))
        text = "\n".join(
            f"--- prompt: {d['prompt']!r}\n    got: {t!r}\n    rewards: "
            + ", ".join(f"{n} {v:.3f}" for n, v in zip(self.reward_names, per_function[i]))
            for i, (d, t) in enumerate(zip(docs[: self.num_samples], texts))
        )
        return scalars, text
