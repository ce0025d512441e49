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
from qwen_jax.data.examples import pad_row, response_example
from qwen_jax.data.tokenizer import Tokenizer
from qwen_jax.model.generate import generate
from qwen_jax.parallel import host_data


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
    placement: host_data.Placement | None = None,
    max_new_tokens: int = 16,
    batch_size: int = 64,
) -> list[str]:
    """Greedy completions of token-id prompts (ending in `<|im_start|>assistant\\n`), split
    over the processes' devices by `placement` (None: one process)."""
    stops = (tokenizer.im_end_id, tokenizer.eos_id)
    answers = []
    for start in range(0, len(prompt_rows), batch_size):
        rows = prompt_rows[start : start + batch_size]
        ids, mask = _left_pad(rows, tokenizer.pad_id)
        batch = host_data.shared_rows(placement, {"ids": ids, "mask": mask})
        tokens, lengths = generate(
            model, batch["ids"], batch["mask"], max_new_tokens=max_new_tokens, stop_tokens=stops
        )
        tokens, lengths = host_data.to_host(tokens), host_data.to_host(lengths)
        for row, n in zip(tokens[: len(rows)], lengths[: len(rows)]):
            answers.append(tokenizer.decode([t for t in row[:n] if t not in stops]).strip())
    return answers


@nnx.jit
def _summed_logprobs(model, batch):
    logits = model(batch["inputs"], batch["positions"], batch["segment_ids"])
    logps = jnp.take_along_axis(
        jax.nn.log_softmax(logits, axis=-1), batch["targets"][..., None], -1
    )
    return (logps[..., 0] * batch["loss_mask"]).sum(-1)


def response_logprobs(
    model,
    tokenizer: Tokenizer,
    prompt_rows: Sequence[np.ndarray],
    responses: Sequence[str],
    *,
    placement: host_data.Placement | None = None,
) -> np.ndarray:
    """Summed log-prob of each response (with its closing `<|im_end|>`) after its prompt."""
    rows = [response_example(tokenizer, p, r) for p, r in zip(prompt_rows, responses)]
    width = max(len(r["inputs"]) for r in rows)
    rows = [pad_row(r, width, tokenizer.pad_id) for r in rows]
    batch = host_data.shared_rows(placement, {k: np.stack([r[k] for r in rows]) for k in rows[0]})
    return host_data.to_host(_summed_logprobs(model, batch))[: len(rows)]


def preference_figures(
    model,
    tokenizer: Tokenizer,
    pairs: Sequence[dict],
    *,
    system_prompt: str | None,
    placement: host_data.Placement | None = None,
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
    chosen, rejected = (
        response_logprobs(
            model, tokenizer, prompt_rows, [p[side] for p in pairs], placement=placement
        )
        for side in ("chosen", "rejected")
    )
    got = greedy_answers(
        model, tokenizer, prompt_rows, placement=placement, max_new_tokens=max_new_tokens
    )
    return {
        "preference_accuracy": float(np.mean(chosen > rejected)),
        "greedy_chosen_rate": float(
            np.mean([g == p["chosen"].strip() for g, p in zip(got, pairs)])
        ),
    }
