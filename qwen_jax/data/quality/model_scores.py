"""Document scores from a qwen_jax model, batched and sharded on the mesh (`eval.scoring.Scorer`).

- `Perplexity`: the mean negative log-likelihood of the document's tokens under a reference model
  (`<field>_nll`, nats per token) and its exponential (`<field>`). Each document is scored after
  the model's document separator (<|endoftext|>), as pre-training packs documents and as
  lm-eval's rolling log-likelihood scores a text's first token, so every token counts.
- `QualityRating`: an instruction model is asked to rate the document on a 0..`max_rating` scale
  in its own chat template; the score is the expected rating under the next-token
  probabilities of the digit tokens, renormalised over the digits (the FineWeb-Edu recipe's
  prompt-a-model approach, read from one forward pass instead of a generated answer).

Both take the first `max_tokens` tokens of a document; both may remove documents outside a range
(`max_perplexity`, `min_rating`), though the usual use is to keep every document with its score
and let a training `Source` select by score (`min_score`, `max_score`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time

import numpy as np
from absl import logging

from qwen_jax.checkpoint import pretrained as pretrained_lib
from qwen_jax.data import chat
from qwen_jax.data import tokenizer as tokenizer_lib
from qwen_jax.data.quality.stage import Document, StageDefaults
from qwen_jax.eval.scoring import Scorer
from qwen_jax.model.layers import Runtime
from qwen_jax.parallel import host_data
from qwen_jax.train import run_tokenizer

RATING_PROMPT = (
    "Below is an extract from a text document. Rate how useful it is as text to learn from, on a "
    "scale from 0 to {max_rating}: 0 for spam, boilerplate, gibberish or broken text; 1 to 2 for "
    "coherent text with little content; 3 to 4 for clear, correct and informative text; "
    "{max_rating} for excellent, well-written material of educational value.\n\n"
    "Extract:\n{text}\n\nAnswer with one digit from 0 to {max_rating}."
)


class _ModelStage(StageDefaults):
    """Loads `checkpoint` (a Hugging Face directory or a qwen_jax checkpoint) and its own
    tokenizer on `open`."""

    checkpoint: str
    batch_size: int
    dtype: str

    def open(self, placement: host_data.Placement | None) -> None:
        model, config, tokenizer_dir = pretrained_lib.load(
            self.checkpoint,
            Runtime(dtype=self.dtype, param_dtype=self.dtype),
            placement,
            what=f"{type(self).__name__}.checkpoint={self.checkpoint}",
        )
        if tokenizer_dir is None:
            raise FileNotFoundError(f"{self.checkpoint}: no tokenizer travels with the model")
        path = os.path.join(tokenizer_dir, tokenizer_lib.TOKENIZER_JSON)
        self.tokenizer = tokenizer_lib.Tokenizer.from_file(path)
        run_tokenizer.check(self.tokenizer, path, config, None)
        self.scorer = Scorer(
            model,
            batch_size=self.batch_size,
            pad_id=self.tokenizer.pad_id,
            placement=placement,
            show_progress=False,
        )

    def _document_ids(self, docs: list[Document], max_tokens: int) -> list[list[int]]:
        return [ids[:max_tokens] for ids in self.tokenizer.encode_batch([d.text for d in docs])]

    def _log_rate(self, what: str, count: int, tokens: int, started: float) -> None:
        seconds = max(time.perf_counter() - started, 1e-9)
        logging.info(
            "%s: %d documents in %.1f s (%.1f docs/s, %.0f tokens/s)",
            what,
            count,
            seconds,
            count / seconds,
            tokens / seconds,
        )


@dataclasses.dataclass
class Perplexity(_ModelStage):
    """Perplexity under a reference model (`field`, and `field`_nll: mean token NLL)."""

    checkpoint: str
    name: str = "perplexity"
    field: str = "perplexity"
    max_tokens: int = 1024
    batch_size: int = 8
    dtype: str = "float32"
    max_perplexity: float | None = None

    def process(self, docs: list[Document]) -> None:
        if not docs:
            return
        started = time.perf_counter()
        ids = self._document_ids(docs, self.max_tokens)
        rows = [[self.tokenizer.eos_id, *d] for d in ids]
        scores = self.scorer.continuation_logprobs(rows, [len(d) for d in ids])
        for doc, tokens, (logprob, _) in zip(docs, ids, scores):
            nll = -logprob / len(tokens)
            perplexity = math.exp(min(nll, 700.0))  # exp overflows a float past ~709
            doc.record[f"{self.field}_nll"] = nll
            doc.record[self.field] = perplexity
            if self.max_perplexity is not None and perplexity > self.max_perplexity:
                doc.remove(
                    f"{self.name}/max_perplexity",
                    f"perplexity {perplexity:.1f} > {self.max_perplexity}",
                )
        self._log_rate(self.name, len(docs), sum(map(len, rows)), started)

    def score_fields(self) -> list[str]:
        return [self.field]


@dataclasses.dataclass
class QualityRating(_ModelStage):
    """The expected 0..`max_rating` rating an instruction model gives the document.

    Attributes:
      prompt: the user turn, with `{text}` (the document's first `max_tokens` tokens, decoded)
        and `{max_rating}`.
      response_prefix: text the assistant turn starts with before the digit (empty: the digit is
        the answer's first token).
      system_prompt: the system turn (None: none).
    """

    checkpoint: str
    name: str = "quality_rating"
    field: str = "quality_rating"
    prompt: str = RATING_PROMPT
    response_prefix: str = ""
    system_prompt: str | None = chat.DEFAULT_SYSTEM_PROMPT
    max_rating: int = 5
    max_tokens: int = 512
    batch_size: int = 8
    dtype: str = "float32"
    min_rating: float | None = None

    def __post_init__(self):
        if not 1 <= self.max_rating <= 9:
            raise ValueError(f"QualityRating.max_rating must be a digit 1-9, got {self.max_rating}")

    def open(self, placement: host_data.Placement | None) -> None:
        super().open(placement)
        self.digit_ids = [self.tokenizer.token_id(str(d)) for d in range(self.max_rating + 1)]

    def prompt_ids(self, text: str) -> list[int]:
        """The rendered chat up to where the rating's digit comes, tokenized as one string."""
        messages = [
            {"role": "user", "content": self.prompt.format(text=text, max_rating=self.max_rating)}
        ]
        rendered, _ = chat.render_text(
            messages, add_generation_prompt=True, system_prompt=self.system_prompt
        )
        return self.tokenizer.encode(rendered + self.response_prefix)

    def process(self, docs: list[Document]) -> None:
        if not docs:
            return
        started = time.perf_counter()
        prompts = [
            self.prompt_ids(self.tokenizer.decode(ids))
            for ids in self._document_ids(docs, self.max_tokens)
        ]
        # One row per (document, digit): rows differing only in the last token share a pass.
        rows = [[*p, digit] for p in prompts for digit in self.digit_ids]
        logprobs = self.scorer.continuation_logprobs(rows, [1] * len(rows))
        digits = np.arange(self.max_rating + 1, dtype=np.float64)
        for i, doc in enumerate(docs):
            row = np.array([lp for lp, _ in logprobs[i * len(digits) : (i + 1) * len(digits)]])
            weights = np.exp(row - row.max())
            rating = float(np.dot(digits, weights) / weights.sum())
            doc.record[self.field] = rating
            if self.min_rating is not None and rating < self.min_rating:
                doc.remove(f"{self.name}/min_rating", f"rating {rating:.2f} < {self.min_rating}")
        self._log_rate(self.name, len(docs), sum(map(len, prompts)), started)

    def score_fields(self) -> list[str]:
        return [self.field]
