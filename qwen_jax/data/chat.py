"""Qwen2.5 ChatML rendering with a loss mask over the assistant's own tokens.

The rendered text follows the official Qwen2.5-Instruct template: each message is
`<|im_start|>{role}\n{content}<|im_end|>\n`, a default system message is inserted when the
conversation has none, consecutive `tool` messages are wrapped in `<tool_response>` blocks
inside one `user` turn, and assistant `tool_calls` become `<tool_call>` blocks. (Tool
*definitions* in the system prompt are not rendered.) The whole text is tokenized at once, exactly
as `apply_chat_template(..., tokenize=True)` would, so ids match the official template even where
the tokenizer merges across a role header and its content; the loss mask is then derived from
character offsets.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np

from qwen_jax.data.bad_records import BadRecord
from qwen_jax.data.tokenizer import IM_END_TOKEN, IM_START_TOKEN, Tokenizer

DEFAULT_SYSTEM_PROMPT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
ROLES = ("system", "user", "assistant", "tool")


def check_messages(messages) -> None:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise BadRecord("bad messages: expected a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise BadRecord(f"bad messages: message {i} is not an object")
        role = m.get("role")
        if role not in ROLES:
            raise BadRecord(f"unknown role: {role!r} in message {i}")
        content = m.get("content")
        if content is None and not (role == "assistant" and m.get("tool_calls")):
            raise BadRecord(f"missing field: message {i} has no content")
        if content is not None and not isinstance(content, str):
            raise BadRecord(f"bad messages: message {i} content is not a string")


def prompt_messages(prompt: str | Sequence[dict]) -> list[dict]:
    """A prompt given as messages, or as a string asked as one user turn."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def _tool_calls_text(message: dict) -> str:
    text = ""
    for call in message.get("tool_calls") or ():
        call = call.get("function", call)
        arguments = call.get("arguments")
        if isinstance(arguments, str):  # OpenAI style: arguments already serialized
            arguments = json.loads(arguments)
        text += (
            '\n<tool_call>\n{"name": "'
            + call["name"]
            + '", "arguments": '
            + json.dumps(arguments, ensure_ascii=False)
            + "}\n</tool_call>"
        )
    return text


def render_text(
    messages: Sequence[dict],
    add_generation_prompt: bool = False,
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
) -> tuple[str, list[tuple[int, int]]]:
    """The ChatML string and the character spans that carry loss (assistant content + <|im_end|>).

    `system_prompt=None` inserts no system message when the conversation has none.
    """
    check_messages(messages)
    parts: list[str] = []
    spans: list[tuple[int, int]] = []
    length = 0

    def emit(text: str, loss: bool = False) -> None:
        nonlocal length
        if loss:
            spans.append((length, length + len(text)))
        parts.append(text)
        length += len(text)

    if messages[0]["role"] != "system" and system_prompt is not None:
        emit(f"{IM_START_TOKEN}system\n{system_prompt}{IM_END_TOKEN}\n")
    for i, m in enumerate(messages):
        role, content = m["role"], m.get("content") or ""
        if role == "tool":
            # The official template folds a run of tool results into a single user turn.
            if i == 0 or messages[i - 1]["role"] != "tool":
                emit(f"{IM_START_TOKEN}user")
            emit(f"\n<tool_response>\n{content}\n</tool_response>")
            if i == len(messages) - 1 or messages[i + 1]["role"] != "tool":
                emit(f"{IM_END_TOKEN}\n")
        elif role == "assistant" and m.get("tool_calls"):
            emit(f"{IM_START_TOKEN}assistant")
            emit(
                (f"\n{content}" if content else "") + _tool_calls_text(m) + IM_END_TOKEN, loss=True
            )
            emit("\n")
        elif role == "assistant":
            emit(f"{IM_START_TOKEN}assistant\n")
            emit(content + IM_END_TOKEN, loss=True)
            emit("\n")
        else:
            emit(f"{IM_START_TOKEN}{role}\n{content}{IM_END_TOKEN}\n")
    if add_generation_prompt:
        emit(f"{IM_START_TOKEN}assistant\n")
    return "".join(parts), spans


def render_chat(
    messages: Sequence[dict],
    tokenizer: Tokenizer,
    add_generation_prompt: bool = False,
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
) -> tuple[np.ndarray, np.ndarray]:
    """Token ids (int32) and a per-token loss mask (float32, 1 on assistant turns' tokens).

    The mask is aligned with the ids: mask[i] says whether token i is to be *predicted*. The
    pipelines shift it with the ids (targets = ids[1:], loss_mask = mask[1:]).
    """
    text, spans = render_text(messages, add_generation_prompt, system_prompt)
    ids, offsets = tokenizer.encode_with_offsets(text)
    mask = np.zeros(len(ids), np.float32)
    if spans and ids:
        starts = np.array([s for s, _ in offsets])
        ends = np.array([e for _, e in offsets])
        for a, b in spans:
            # A token takes loss when it overlaps the span (it can only straddle the span's start when
            # the content begins with a character the tokenizer merges into the header's newline).
            mask[(starts < b) & (ends > a)] = 1.0
    return np.asarray(ids, np.int32), mask
