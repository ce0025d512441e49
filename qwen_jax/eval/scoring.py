"""The model's side of an lm-eval request, in batches on the mesh, without lm-eval.

- `Scorer.continuation_logprobs`: for token rows and how many of their last tokens are the
  continuation, the summed log-probability of the continuation and whether greedy decoding
  would have produced it (lm-eval's `loglikelihood` answer).
- `Scorer.generate`: continuations of token prompts (KV-cache decoding, greedy or sampled).

Requests are sorted longest first and cut into batches of `batch_size` rows; each batch is
padded to a length bucket (`bucket`) and to `batch_size` rows, so a whole evaluation
compiles a handful of programs. With a `placement`, each batch is a global array on the mesh
(`host_data.shared_rows`), every process feeding its devices' rows; every process gets every
answer back.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from flax import nnx

from qwen_jax.model.generate import Sampling, generate
from qwen_jax.parallel import host_data

MIN_BUCKET = 16
_SCORE_INPUTS = ("inputs", "targets", "scored", "last")


def bucket(length: int) -> int:
    """The padded length of a row of `length` tokens: at least `MIN_BUCKET`, and above it the next
    multiple of a quarter of the power of two below, so at most four shapes per octave compile
    and padding adds under a third."""
    if length <= MIN_BUCKET:
        return MIN_BUCKET
    step = max(MIN_BUCKET, (1 << ((length - 1).bit_length() - 1)) // 4)
    return -(-length // step) * step


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _score(graphdef, state, inputs, targets, scored, last):
    """Per row: the summed log-prob of the scored targets before the row's last position and
    whether each is the argmax; the log-probs over the vocabulary at the last position and their
    argmax (so rows that differ only in their last target share one pass)."""
    model = nnx.merge(graphdef, state)
    segment_ids = (scored >= 0).astype(jnp.int32)  # -1 marks padding
    positions = jnp.broadcast_to(jnp.arange(inputs.shape[1], dtype=jnp.int32), inputs.shape)
    log_probs = jax.nn.log_softmax(model(inputs, positions, segment_ids).astype(jnp.float32), -1)
    logps = jnp.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
    argmax = jnp.argmax(log_probs, -1)
    mask = scored > 0
    rows = jnp.arange(inputs.shape[0])
    return (
        jnp.sum(jnp.where(mask, logps, 0.0), -1),
        jnp.all((argmax == targets) | ~mask, -1),
        log_probs[rows, last],
        argmax[rows, last],
    )


class Scorer:
    """Batched scoring and generation with one model.

    Args:
      model: a `Qwen2ForCausalLM` (sharded or not).
      batch_size: rows per compiled batch (a multiple of the placement's batch shards is
        rounded up to).
      pad_id: the id written into padding (never attended to or scored).
      placement: the mesh batches go to; None: the model's default device, one process.
      show_progress: a progress bar with the rate and ETA on stderr (`tqdm`).
    """

    def __init__(
        self,
        model,
        *,
        batch_size: int,
        pad_id: int,
        placement: host_data.Placement | None = None,
        show_progress: bool = True,
    ):
        self.graphdef, self.state = nnx.split(model)
        self.model = model
        shards = 1 if placement is None else placement.batch_shards
        self.batch_size = -(-max(1, batch_size) // shards) * shards
        self.pad_id, self.placement = pad_id, placement
        self.show_progress = show_progress

    def _batches(self, order: Sequence[int], desc: str, requests=lambda item: 1):
        """`order` in batches, advancing a progress bar by each batch's requests (an item of
        `order` stands for `requests(item)` of them)."""
        total = sum(requests(item) for item in order)
        with tqdm.tqdm(total=total, desc=desc, disable=not self.show_progress) as bar:
            for start in range(0, len(order), self.batch_size):
                chunk = order[start : start + self.batch_size]
                yield chunk
                bar.update(sum(requests(item) for item in chunk))

    def continuation_logprobs(
        self, rows: Sequence[Sequence[int]], continuation_lengths: Sequence[int], desc: str = ""
    ) -> list[tuple[float, bool]]:
        """(summed log-prob, is greedy) of the last `continuation_lengths[i]` tokens of
        `rows[i]`, each predicted from the tokens before it (`rows[i]` holds context and
        continuation; its first token is only conditioned on).

        Rows equal but for their last token (the options of a multiple-choice question with
        one-token answers, or repeated requests) take one forward pass together, as lm-eval's hf
        model does with its logits cache."""
        groups: dict[tuple, list[int]] = {}
        for i, (row, n) in enumerate(zip(rows, continuation_lengths)):
            groups.setdefault((tuple(row[:-1]), n), []).append(i)
        members = list(groups.values())
        order = sorted(range(len(members)), key=lambda g: -len(rows[members[g][0]]))
        answers: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
        for chunk in self._batches(order, desc, lambda g: len(members[g])):
            width = bucket(max(len(rows[members[g][0]]) - 1 for g in chunk))
            inputs = np.full((self.batch_size, width), self.pad_id, np.int32)
            targets = np.zeros((self.batch_size, width), np.int32)
            # 1: a continuation token scored in the pass, 0: context or the last position (scored
            # per member from its log-probs), -1: padding.
            scored = np.full((self.batch_size, width), -1, np.int32)
            last = np.zeros(self.batch_size, np.int32)
            for slot, g in enumerate(chunk):
                row, n = (
                    np.asarray(rows[members[g][0]], np.int32),
                    continuation_lengths[members[g][0]],
                )
                length = len(row) - 1
                inputs[slot, :length], targets[slot, :length] = row[:-1], row[1:]
                scored[slot, :length] = 0
                scored[slot, length - n : length - 1] = 1
                last[slot] = length - 1
            batch = host_data.shared_rows(
                self.placement,
                {"inputs": inputs, "targets": targets, "scored": scored, "last": last},
            )
            outputs = _score(self.graphdef, self.state, *(batch[k] for k in _SCORE_INPUTS))
            sums, greedy, last_logps, last_argmax = (host_data.to_host(x) for x in outputs)
            for slot, g in enumerate(chunk):
                for i in members[g]:
                    target = rows[i][-1]
                    answers[i] = (
                        float(sums[slot] + last_logps[slot, target]),
                        bool(greedy[slot] and last_argmax[slot] == target),
                    )
        return answers

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int,
        stop_tokens: Sequence[int],
        sampling: Sampling,
        rng: jax.Array,
        desc: str = "",
    ) -> list[list[int]]:
        """New tokens for each prompt, up to and including the first stop token."""
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        outputs: list[list[int]] = [[] for _ in prompts]
        for number, chunk in enumerate(self._batches(order, desc)):
            width = bucket(max(len(prompts[i]) for i in chunk))
            ids = np.full((self.batch_size, width), self.pad_id, np.int32)
            mask = np.zeros((self.batch_size, width), np.int32)
            for slot in range(self.batch_size):
                prompt = prompts[chunk[min(slot, len(chunk) - 1)]]  # spare rows copy the last
                ids[slot, width - len(prompt) :] = prompt
                mask[slot, width - len(prompt) :] = 1
            batch = host_data.shared_rows(self.placement, {"ids": ids, "mask": mask})
            tokens, lengths = generate(
                self.model,
                batch["ids"],
                batch["mask"],
                max_new_tokens=max_new_tokens,
                stop_tokens=stop_tokens,
                sampling=sampling,
                rng=jax.random.fold_in(rng, number),
                pad_id=self.pad_id,
            )
            tokens, lengths = host_data.to_host(tokens), host_data.to_host(lengths)
            for slot, i in enumerate(chunk):
                outputs[i] = [int(t) for t in tokens[slot, : lengths[slot]]]
        return outputs
