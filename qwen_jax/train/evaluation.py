"""Generation-based figures on held-out data, for the eval hooks and the demo.

- `greedy_answers`: greedy completions of rendered chat prompts, up to `<|im_end|>`; exact match
  compares them with the reference answers.
- `preference_figures`: on preference pairs, how often the model gives the chosen response a
  higher log-probability than the rejected one, and how often greedy decoding produces exactly
  the chosen response. Both are policy-only, so meaningful before and after training alike
  (TRL's `rewards/accuracies` compares with the reference and is 0 at the start by definition).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwen_jax.data.chat import prompt_messages, render_chat
from qwen_jax.data.tokenizer import Tokenizer
from qwen_jax.model.generate import generate


def _left_pad(rows: Sequence[np.ndarray], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = row
        mask[i, width - len(row) :] = 1
    return ids, mask


def greedy_answers(
    model,
    tokenizer: Tokenizer,
    prompt_rows: Sequence[np.ndarray],
    *,
    max_new_tokens: int = 16,
    batch_size: int = 64,
) -> list[str]:
    """Greedy completions of token-id prompts (ending in `<|im_start|>assistant\\n`)."""
    stops = (tokenizer.im_end_id, tokenizer.eos_id)
    answers = []
    for start in range(0, len(prompt_rows), batch_size):
        ids, mask = _left_pad(prompt_rows[start : start + batch_size], tokenizer.pad_id)
        tokens, lengths = generate(
            model, ids, mask, max_new_tokens=max_new_tokens, stop_tokens=stops
        )
        for row, n in zip(np.asarray(tokens), np.asarray(lengths)):
            answers.append(tokenizer.decode([t for t in row[:n] if t not in stops]).strip())
    return answers


@nnx.jit
def _summed_logprobs(model, ids, segment_ids, target_mask):
    logits = model(ids[:, :-1], segment_ids=segment_ids[:, :-1])
    logps = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), ids[:, 1:, None], axis=-1)
    return (logps[..., 0] * target_mask[:, 1:]).sum(-1)


def response_logprobs(
    model, tokenizer: Tokenizer, prompt_rows: Sequence[np.ndarray], responses: Sequence[str]
) -> np.ndarray:
    """Summed log-prob of each response (with its closing `<|im_end|>`) after its prompt."""
    rows, masks = [], []
    for prompt_ids, response in zip(prompt_rows, responses):
        response_ids = tokenizer.encode(response) + [tokenizer.im_end_id]
        rows.append(np.concatenate([prompt_ids, response_ids]).astype(np.int32))
        masks.append(np.r_[np.zeros(len(prompt_ids)), np.ones(len(response_ids))])
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), tokenizer.pad_id, np.int32)
    segment_ids = np.zeros((len(rows), width), np.int32)
    target_mask = np.zeros((len(rows), width), np.float32)
    for i, (row, mask) in enumerate(zip(rows, masks)):
        ids[i, : len(row)], segment_ids[i, : len(row)], target_mask[i, : len(row)] = row, 1, mask
    return np.asarray(_summed_logprobs(model, ids, segment_ids, target_mask))


def preference_figures(
    model,
    tokenizer: Tokenizer,
    pairs: Sequence[dict],
    *,
    system_prompt: str | None,
    max_new_tokens: int = 16,
) -> dict:
    """{'preference_accuracy', 'greedy_chosen_rate'} over `pairs` of {prompt, chosen, rejected}
    (prompt: messages, or a string asked as one user turn)."""
    prompt_rows = [
        render_chat(
            prompt_messages(p["prompt"]),
            tokenizer,
            add_generation_prompt=True,
            system_prompt=system_prompt,
        )[0]
        for p in pairs
    ]
    chosen = response_logprobs(model, tokenizer, prompt_rows, [p["chosen"] for p in pairs])
    rejected = response_logprobs(model, tokenizer, prompt_rows, [p["rejected"] for p in pairs])
    got = greedy_answers(model, tokenizer, prompt_rows, max_new_tokens=max_new_tokens)
    return {
        "preference_accuracy": float(np.mean(chosen > rejected)),
        "greedy_chosen_rate": float(
            np.mean([g == p["chosen"].strip() for g, p in zip(got, pairs)])
        ),
    }
