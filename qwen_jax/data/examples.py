"""Documents -> next-token examples: `inputs`, `targets` and `loss_mask` of equal length.

Pre-training documents are framed as `<|endoftext|> doc <|endoftext|>`, then shifted: every
document token and the closing `<|endoftext|>` are targets, each document opens with the
separator as its first input, and packed rows therefore read `EOS doc1 EOS doc2 ...` with the
separator between documents. Chat examples are the rendered conversation shifted by one, with
the loss mask carried from `render_chat`. DPO pairs are built whole, one pair per row; GRPO
prompts are rendered up to the generation prompt and left-padded, for the decoder.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import grain
import numpy as np
from absl import logging

from qwen_jax.data import chat
from qwen_jax.data.tokenizer import Tokenizer

LM_FEATURES = ("inputs", "targets", "loss_mask")


def shifted_example(ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    """inputs = ids[:-1], targets = ids[1:]; mask[i] (is token i learned) moves with its target."""
    return {
        "inputs": ids[:-1].astype(np.int32),
        "targets": ids[1:].astype(np.int32),
        "loss_mask": mask[1:].astype(np.float32),
    }


def lm_example(tokens: np.ndarray, eos_id: int) -> dict[str, np.ndarray]:
    framed = np.concatenate([[eos_id], np.asarray(tokens, np.int32), [eos_id]]).astype(np.int32)
    return shifted_example(framed, np.ones(len(framed), np.float32))


def split_example(example: dict[str, np.ndarray], seq_len: int) -> list[dict[str, np.ndarray]]:
    """Cuts an example longer than a row into row-sized pieces (input/target pairs stay together,
    so no target is lost; each piece starts at position 0 in its row)."""
    n = len(example["inputs"])
    if n <= seq_len:
        return [example]
    return [{k: v[i : i + seq_len] for k, v in example.items()} for i in range(0, n, seq_len)]


class DocumentsToExamples(grain.experimental.FlatMapTransform):
    """A list of pre-training documents -> their examples, tokenized with one `encode_batch`.

    Tokenizing a list at a time lets the Rust tokenizer use every core from a single Python
    process; the list size is the pipeline's `tokenize_batch`.
    """

    # Grain checks this bound only for MapDataset flat maps; documents may split into many rows.
    max_fan_out = 1 << 30

    def __init__(self, tokenizer: Tokenizer, seq_len: int | None):
        self._tokenizer = tokenizer
        self._seq_len = seq_len  # None: leave long examples whole (concat-then-split cuts them)

    def flat_map(self, docs: Sequence[dict]) -> list[dict]:
        encoded = iter(self._tokenizer.encode_batch([d["text"] for d in docs if "text" in d]))
        out = []
        for doc in docs:
            tokens = doc["tokens"] if "tokens" in doc else np.asarray(next(encoded), np.int32)
            example = lm_example(tokens, self._tokenizer.eos_id)
            out.extend(split_example(example, self._seq_len) if self._seq_len else [example])
        return out


class ChatToExample:
    """Grain map: chat document -> example, truncated to the row length (a conversation split
    across rows would train later turns without their context)."""

    def __init__(self, tokenizer: Tokenizer, seq_len: int, system_prompt: str | None):
        self._tokenizer = tokenizer
        self._seq_len = seq_len
        self._system_prompt = system_prompt
        self.truncated = 0

    def __call__(self, doc: dict) -> dict[str, np.ndarray]:
        ids, mask = chat.render_chat(
            doc["messages"], self._tokenizer, system_prompt=self._system_prompt
        )
        example = shifted_example(ids, mask)
        if len(example["inputs"]) > self._seq_len:
            self.truncated += 1
            if self.truncated <= 5:
                logging.warning(
                    "conversation at %s has %d tokens; truncated to seq_len %d",
                    doc["loc"],
                    len(ids),
                    self._seq_len,
                )
            example = {k: v[: self._seq_len] for k, v in example.items()}
        return example


def response_example(
    tokenizer: Tokenizer,
    prompt_ids: np.ndarray,
    response: str,
    max_response_len: int | None = None,
    *,
    shift: bool = True,
) -> dict[str, np.ndarray]:
    """`prompt + response` shifted for next-token prediction; the response (the answer plus
    `<|im_end|>`, its first `max_response_len` tokens) carries the loss mask. `shift=False`: the
    whole conversation as `inputs`, ending `<|im_end|>\n` as the chat template writes it, with
    the response's mask: a reward model reads its last token, as transformers' classifier reads
    the last token of `apply_chat_template`'s output."""
    closing = [tokenizer.im_end_id] + ([] if shift else tokenizer.encode("\n"))
    response_ids = np.asarray(tokenizer.encode(response) + closing, np.int32)
    response_ids = response_ids[:max_response_len]
    ids = np.concatenate([prompt_ids, response_ids])
    mask = np.concatenate(
        [np.zeros(len(prompt_ids), np.float32), np.ones(len(response_ids), np.float32)]
    )
    if not shift:
        return {"inputs": ids.astype(np.int32), "loss_mask": mask}
    return shifted_example(ids, mask)


def pad_row(example: dict[str, np.ndarray], length: int, pad_id: int) -> dict[str, np.ndarray]:
    """One unpacked example right-padded to `length`, with its segment ids and positions."""
    n = len(example["inputs"])
    pad = {"inputs": pad_id, "targets": pad_id, "loss_mask": 0}
    row = {k: np.pad(v, (0, length - n), constant_values=pad[k]) for k, v in example.items()}
    row["segment_ids"] = (np.arange(length) < n).astype(np.int32)
    row["positions"] = np.where(row["segment_ids"] > 0, np.arange(length), 0).astype(np.int32)
    return row


class PreferenceToExample:
    """Grain map: preference document -> one row holding both sequences of the pair.

    Both sequences are `prompt + response`, where the prompt is the ChatML conversation up to the
    generation prompt (kept from the right: its last `prompt_len` tokens) and the response is the
    answer plus `<|im_end|>` (kept from the left: its first `response_len` tokens). Rows have
    length prompt_len + response_len; `*_loss_mask` is 1 where the target is a response token.
    With `reference_logps` ({record location: (chosen, rejected) summed log-probs}, computed once
    before DPO training), rows also carry `reference_chosen_logps` and `reference_rejected_logps`.
    `shift=False` (a reward model's rows): each conversation whole as `*_inputs`, no targets
    (see `response_example`).
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_len: int,
        response_len: int,
        system_prompt: str | None,
        reference_logps: Mapping[str, tuple[float, float]] | None = None,
        shift: bool = True,
    ):
        self._shift = shift
        self._tokenizer = tokenizer
        self._prompt_len = prompt_len
        self._response_len = response_len
        self._system_prompt = system_prompt
        self._reference_logps = reference_logps

    def __call__(self, doc: dict) -> dict[str, np.ndarray]:
        prompt_ids, _ = chat.render_chat(
            chat.prompt_messages(doc["prompt"]),
            self._tokenizer,
            add_generation_prompt=True,
            system_prompt=self._system_prompt,
        )
        prompt_ids = prompt_ids[-self._prompt_len :]
        out = {}
        for name in ("chosen", "rejected"):
            example = response_example(
                self._tokenizer, prompt_ids, doc[name], self._response_len, shift=self._shift
            )
            row = pad_row(example, self._prompt_len + self._response_len, self._tokenizer.pad_id)
            for k, v in row.items():
                out[f"{name}_{k}"] = v
        if self._reference_logps is not None:
            if doc["loc"] not in self._reference_logps:
                raise ValueError(
                    f"{doc['loc']}: no precomputed reference log-probs for this pair (the "
                    f"data changed after they were computed)"
                )
            chosen, rejected = self._reference_logps[doc["loc"]]
            out["reference_chosen_logps"] = np.float32(chosen)
            out["reference_rejected_logps"] = np.float32(rejected)
        return out


class PromptToExample:
    """Grain map: prompt document -> `prompt_ids` and `prompt_mask` [max_prompt_len], the ChatML
    prompt up to `<|im_start|>assistant\n` (a string prompt is one user turn), its last
    `max_prompt_len` tokens left-padded; and `record`, the document as JSON (prompt, location
    and fields), which the reward functions read after sampling."""

    def __init__(self, tokenizer: Tokenizer, max_prompt_len: int, system_prompt: str | None):
        self._tokenizer = tokenizer
        self._max_prompt_len = max_prompt_len
        self._system_prompt = system_prompt

    def __call__(self, doc: dict) -> dict[str, np.ndarray]:
        ids, _ = chat.render_chat(
            chat.prompt_messages(doc["prompt"]),
            self._tokenizer,
            add_generation_prompt=True,
            system_prompt=self._system_prompt,
        )
        ids = ids[-self._max_prompt_len :]
        pad = self._max_prompt_len - len(ids)
        record = {"prompt": doc["prompt"], "loc": doc["loc"], "fields": doc["fields"]}
        return {
            "prompt_ids": np.pad(ids, (pad, 0), constant_values=self._tokenizer.pad_id).astype(
                np.int32
            ),
            "prompt_mask": (np.arange(self._max_prompt_len) >= pad).astype(np.int32),
            "record": np.asarray(json.dumps(record, ensure_ascii=False)),
        }
