"""Reward-model training on preference pairs: the loss and metrics of TRL's `RewardTrainer`.

The model is `Qwen2ForSequenceClassification` with one output, its score read at each sequence's
last token: the conversation (prompt + response) as the chat template writes it, ending
`<|im_end|>\n`, so an export scores `apply_chat_template`'s output in transformers as it scored
in training. Per pair, with r_c and r_r the chosen and rejected scores and c the
`center_rewards_coefficient` (TRL's name; Eisenstein et al. 2023):

  loss = -log sigmoid(r_c - r_r) + c (r_c + r_r)^2          (Bradley-Terry, plus centering)

TRL averages each over the batch; here each is summed over pairs and divided by their number,
which is the same mean and stays exact under gradient accumulation and data parallelism. The
metrics are TRL's `accuracy` (r_c > r_r, strictly), `margin` (r_c - r_r) and `mean_reward` (over
both sides), with the sides' means beside them; TRL's min_reward and max_reward are left out,
since a step's metrics are sums over microbatches and devices.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwen_jax.checkpoint import pretrained
from qwen_jax.data import chat, examples
from qwen_jax.data import tokenizer as tokenizer_lib
from qwen_jax.data.chat import DEFAULT_SYSTEM_PROMPT
from qwen_jax.data.tokenizer import Tokenizer
from qwen_jax.model.config import QwenConfig
from qwen_jax.train import dpo, rewards
from qwen_jax.train.tasks import PairTask, eval_pass

PAIR_METRICS = ("accuracy", "margin", "mean_reward", "rewards/chosen", "rewards/rejected")


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    center_rewards_coefficient: float = 0.0

    def __post_init__(self):
        if self.center_rewards_coefficient < 0:
            raise ValueError(
                f"RewardConfig.center_rewards_coefficient={self.center_rewards_coefficient} "
                f"must be >= 0"
            )


def bradley_terry_terms(config: RewardConfig, chosen: jax.Array, rejected: jax.Array) -> dict:
    """Per-pair loss and metrics, each [B], from the chosen and rejected scores [B]."""
    margin = chosen - rejected
    loss = -jax.nn.log_sigmoid(margin)
    if config.center_rewards_coefficient:
        loss = loss + config.center_rewards_coefficient * (chosen + rejected) ** 2
    return {
        "loss": loss,
        "accuracy": (chosen > rejected).astype(jnp.float32),
        "margin": margin,
        "mean_reward": (chosen + rejected) / 2,
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
    }


def pair_scores(model, batch: dict) -> tuple[jax.Array, jax.Array]:
    """(chosen, rejected) scores [B]: both sides through the model as one batch of 2B rows."""

    def both(key):
        return jnp.concatenate([batch[f"chosen_{key}"], batch[f"rejected_{key}"]], axis=0)

    scores = model(both("inputs"), both("positions"), both("segment_ids"))[:, 0]
    half = batch["chosen_inputs"].shape[0]
    return scores[:half], scores[half:]


def make_reward_loss_fn(config: RewardConfig):
    """`loss_fn(model, batch, frozen) -> (loss_sum, aux)` in the train step's contract (see
    `dpo.make_dpo_loss_fn`): sums over the pairs, `aux["weight"]` = the number of pairs."""

    def loss_fn(model, batch, frozen):
        del frozen
        terms = bradley_terry_terms(config, *pair_scores(model, batch))
        # Rows with an empty response are padding (the last batch of an eval pass).
        real = (batch["chosen_loss_mask"].sum(-1) > 0).astype(jnp.float32)
        tokens = sum(
            jnp.sum((batch[f"{side}_segment_ids"] != 0).astype(jnp.float32)) for side in dpo.SIDES
        )
        sums = {k: jnp.sum(v * real) for k, v in terms.items()}
        return sums.pop("loss"), {"weight": jnp.sum(real), "tokens": tokens, **sums}

    return loss_fn


class RewardModelTask(PairTask):
    """A reward model (`Qwen2ForSequenceClassification`, one output) trained on preference pairs
    with the Bradley-Terry loss. Started from a causal LM (`init_from`, e.g. the SFT model), it
    keeps the decoder and starts a new score head, as transformers' `from_pretrained` does.
    Evaluation: the loss and `accuracy` on the held-out pairs.

    seq_len, prompt_len: as `tasks.DPOTask`'s (`tasks.PairTask`).
    """

    kind = "reward_model"

    def __init__(
        self,
        source,
        seq_len: int,
        batch_size: int,
        prompt_len: int | None = None,
        num_epochs: int | None = 1,
        config: RewardConfig | None = None,
        eval_source=None,
        eval_batch_size: int = 16,
        system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
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
        self.config = config or RewardConfig()
        self.loss_fn = make_reward_loss_fn(self.config)

    def model_config(self, config: QwenConfig, stage: str) -> QwenConfig:
        return config.replace(num_labels=1)

    def _row_options(self) -> dict:
        return {"shift": False}  # whole conversations: the score is read at the last token

    def step_metrics(self, metrics: dict) -> dict:
        return dpo.pair_means(metrics, PAIR_METRICS)

    def evaluate(self, model, frozen, tokenizer, eval_step, stage: str, placement):
        batches = self._pairs(
            self.eval_source, tokenizer, batch_size=self.eval_batch_size, for_eval=True
        )
        return eval_pass(eval_step, batches, PAIR_METRICS), None


@nnx.jit
def _scores(model, rows):
    return model(rows["inputs"], rows["positions"], rows["segment_ids"])[:, 0]


class RewardModelScore:
    """A GRPO reward function: the score of a reward-model checkpoint (a qwen_jax checkpoint or
    a Hugging Face `Qwen2ForSequenceClassification` directory with one output) for each prompt
    and completion, computed on the run's mesh.

    The reward model reads the conversation as the policy's tokenizer writes it: the ChatML
    prompt the policy saw (its last `max_prompt_len` tokens), then the completion's text and
    `<|im_end|>\n`, the layout `RewardModelTask` trains on (and the chat template writes). So it
    must share the policy's vocabulary: `GRPOTask.check` refuses one of another vocabulary before
    the run starts, and `GRPOTask.prepare` attaches it, loading the model once.
    """

    fields: tuple[str, ...] = ()

    def __init__(self, checkpoint: str, name: str = "reward_model", batch_size: int = 64):
        self.checkpoint, self.name, self.batch_size = checkpoint, name, batch_size
        self._model = self._tokenizer = self._placement = None

    def check(self, tokenizer: Tokenizer) -> None:
        """Refuses, in one line, a checkpoint that is not a one-output reward model of the
        policy's vocabulary."""
        what = f"reward model {self.checkpoint}"
        config, tokenizer_dir = pretrained.read_config(self.checkpoint)
        if config.num_labels != 1:
            raise ValueError(
                f"{what}: is a {config.architecture}"
                f"{'' if config.num_labels is None else f' with {config.num_labels} outputs'}, "
                f"not a reward model (Qwen2ForSequenceClassification with one output)"
            )
        if tokenizer.vocab_size > config.vocab_size:
            raise ValueError(
                f"{what}: has a vocabulary of {config.vocab_size} ids, the policy's tokenizer "
                f"{tokenizer.vocab_size}; it must read the policy's token ids"
            )
        if tokenizer_dir is None:
            return
        own = Tokenizer.from_file(os.path.join(tokenizer_dir, tokenizer_lib.TOKENIZER_JSON))
        theirs, ours = own.vocab, tokenizer.vocab
        differ = sorted(t for t in theirs.keys() | ours.keys() if theirs.get(t) != ours.get(t))
        if differ:
            raise ValueError(
                f"{what}: its tokenizer ({tokenizer_dir}) has another vocabulary than the "
                f"policy's: {len(differ)} tokens differ, e.g. {differ[0]!r} is id "
                f"{theirs.get(differ[0])} there and {ours.get(differ[0])} in the policy's"
            )

    def attach(
        self, tokenizer, *, system_prompt, max_prompt_len, max_length, load_model, placement
    ):
        """Loads the model on the run's mesh (`load_model(directory)`) and fixes the layout."""
        self._model, self._placement = load_model(self.checkpoint), placement
        self._tokenizer, self._system_prompt = tokenizer, system_prompt
        self._max_prompt_len = max_prompt_len
        # One compiled shape: rows of the longest prompt and completion, in 64-token steps.
        self._length = -(-max_length // 64) * 64

    def _row(self, prompt, completion) -> dict:
        prompt_ids, _ = chat.render_chat(
            chat.prompt_messages(prompt),
            self._tokenizer,
            add_generation_prompt=True,
            system_prompt=self._system_prompt,
        )
        prompt_ids = np.asarray(prompt_ids[-self._max_prompt_len :], np.int32)
        text = rewards.completion_text(completion)
        room = self._length - len(prompt_ids)
        example = examples.response_example(self._tokenizer, prompt_ids, text, room, shift=False)
        return examples.pad_row(example, self._length, self._tokenizer.pad_id)

    def __call__(self, prompts, completions, completion_ids=None, **fields):
        if self._model is None:
            raise RuntimeError(f"reward function {self.name!r} was not attached to a run")
        rows = [self._row(p, c) for p, c in zip(prompts, completions)]
        # Every process scores its own rows; each call's rows fill the batch axes evenly.
        step = max(1, self._placement.batch_shards // jax.process_count())
        scores = []
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start : start + self.batch_size]
            padded = chunk + [_empty(chunk[0])] * (-len(chunk) % step)
            batch = {
                k: np.stack([r[k] for r in padded]) for k in ("inputs", "positions", "segment_ids")
            }
            out = _scores(self._model, self._placement.from_local(batch, split_length=False))
            scores.extend(self._placement.to_local(out)[: len(chunk)].tolist())
        return scores


def _empty(row: dict) -> dict:
    return {k: np.zeros_like(v) for k, v in row.items()}
