"""Turns raw records into documents, rejecting (and counting) the ones that cannot be used.

A document is one of: `{"text": str}` or `{"tokens": int array}` (pre-training),
`{"messages": [...]}` (SFT), `{"prompt": str | messages, "chosen": str, "rejected": str}` (DPO),
`{"prompt": str | messages, "fields": {...}}` (GRPO prompts, with the record's other fields for
the reward functions), each with its `"source"` and `"loc"`.

Chat and preference records come in the formats users already have (TRL's dataset formats):
  SFT   conversational   {"messages": [{"role": "user", "content": ...}, ...]}
        prompt-completion {"prompt": str | messages, "completion": str | messages}
  DPO   explicit prompt  {"prompt": str | messages, "chosen": str | messages, "rejected": ...}
        implicit prompt  {"chosen": messages, "rejected": messages}, sharing a prefix (the prompt)
  GRPO  prompt-only      {"prompt": str | messages, ...fields the reward functions read}
A string prompt is one user turn and a string completion one assistant turn, both rendered with
the chat template (TRL would leave plain strings unrendered; here every SFT/DPO record is a chat).
`check_format` names the file and the fields it saw when a file's first record is in none of them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from qwen_jax.data import chat
from qwen_jax.data.bad_records import BadRecord, BadRecordTracker
from qwen_jax.data.config import Source

TOKEN_DTYPE = np.dtype("<u4")  # prepared ArrayRecord shards: little-endian uint32 ids

KINDS = ("text", "messages", "preference", "prompt")


def preference_keys(source: Source) -> list[str]:
    keys = source.field.split("/")
    if len(keys) != 3:
        raise ValueError(
            f"Source {source.name!r}: a preference source needs field='prompt/chosen/"
            f"rejected' (three keys joined by '/'), got {source.field!r}"
        )
    return keys


PROMPT, COMPLETION = "prompt", "completion"  # TRL's prompt-completion keys


class OutOfScoreRange(Exception):
    """A record whose score is outside its source's range: skipped, not bad."""


def columns(source: Source, kind: str) -> list[str]:
    """The record keys a document of `kind` may need (Parquet reads only these columns)."""
    if kind == "prompt":
        return []  # every field: reward functions may read any of them
    if kind == "preference":
        keys = preference_keys(source)
    elif kind == "messages":
        keys = [source.field, PROMPT, COMPLETION]
    else:
        keys = [source.field]
    return keys + ([source.score_field] if source.score_field else [])


def _check_score(obj: Mapping, source: Source) -> None:
    value = _get(obj, source.score_field)
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        raise BadRecord(
            f"bad field: {source.score_field!r} is {type(value).__name__}, not a number"
        )
    if not source.in_score_range(float(value)):
        raise OutOfScoreRange


def _format_keys(source: Source, kind: str) -> list[tuple[str, ...]]:
    """Each accepted format of `kind` as the keys that identify it, in order of preference."""
    if kind == "messages":
        return [(source.field,), (PROMPT, COMPLETION)]
    if kind == "preference":
        prompt, chosen, rejected = preference_keys(source)
        return [(prompt, chosen, rejected), (chosen, rejected)]
    return [(source.field,)]


def check_format(
    source: Source,
    kind: str,
    first_records: Iterable[tuple[str, Any]],
    required: Mapping[str, str] | None = None,
) -> None:
    """Fails, naming the file and the fields seen, when the first record of a file is an object
    in none of `kind`'s formats, or lacks a field of `required` ({field: who reads it}); a
    malformed first record is left to the bad-record count."""
    formats = _format_keys(source, kind)
    for loc, value in first_records:
        try:
            obj = as_object(value)
        except BadRecord:
            continue
        if not any(all(k in obj for k in keys) for keys in formats):
            expected = " or ".join("+".join(repr(k) for k in keys) for keys in formats)
            raise ValueError(
                f"{loc}: unknown {kind} data format: the record has fields "
                f"{sorted(obj)}; expected {expected}"
            )
        for field, reader in (required or {}).items():
            if field not in obj:
                raise ValueError(
                    f"{loc}: the record has no field {field!r}, which {reader} reads (it has "
                    f"fields {sorted(obj)})"
                )


def as_object(value: Any) -> Mapping:
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadRecord(f"non-UTF-8 bytes: {e.reason} at byte {e.start}") from None
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            if not value.strip():
                raise BadRecord("empty line") from None
            raise BadRecord(f"malformed JSON: {e.msg} at column {e.colno}") from None
    if not isinstance(value, Mapping):
        raise BadRecord(f"malformed JSON: expected an object, got {type(value).__name__}")
    return value


def _get(obj: Mapping, key: str) -> Any:
    if key not in obj or obj[key] is None:
        raise BadRecord(f"missing field: {key!r}")
    value = obj[key]
    return value.decode("utf-8") if isinstance(value, bytes) else value


def _text(obj: Mapping, key: str) -> str:
    value = _get(obj, key)
    if not isinstance(value, str):
        raise BadRecord(f"bad field: {key!r} is {type(value).__name__}, not a string")
    if not value.strip():
        raise BadRecord("empty document")
    return value


def _turns(value: Any, key: str, role: str) -> list:
    """A field holding a string (one `role` turn) or a messages list, as a messages list."""
    if isinstance(value, str):
        if not value.strip():
            raise BadRecord(f"empty document: {key!r} is empty")
        return [{"role": role, "content": value}]
    if not isinstance(value, list):
        raise BadRecord(f"bad field: {key!r} is {type(value).__name__}, not a string or messages")
    chat.check_messages(value)
    return list(value)


def _response(obj: Mapping, key: str, prompt_turns: int = 0) -> str:
    """A DPO response: a string, or a messages list whose messages after the first
    `prompt_turns` are one assistant message."""
    value = _get(obj, key)
    if isinstance(value, list):
        chat.check_messages(value)
        rest = value[prompt_turns:]
        if len(rest) != 1 or rest[0]["role"] != "assistant":
            raise BadRecord(
                f"bad field: {key!r} must end with one assistant message after the prompt"
            )
        value = rest[0]["content"]
    if not isinstance(value, str):
        raise BadRecord(f"bad field: {key!r} is {type(value).__name__}")
    if not value.strip():
        raise BadRecord(f"empty document: {key!r} is empty")
    return value


def parse(record: Mapping, source: Source, kind: str, required: Sequence[str] = ()) -> dict:
    """The document in `record`; BadRecord with the reason, or OutOfScoreRange. `required`:
    fields a prompt record must have."""
    value = record["value"]
    doc = {"source": record["source"], "loc": record["loc"]}
    if source.field == "tokens":
        if isinstance(value, (bytes, bytearray)):
            tokens = np.frombuffer(value, TOKEN_DTYPE).astype(np.int32)
        else:
            tokens = np.asarray(_get(value, "tokens"), np.int32).reshape(-1)
        if tokens.size == 0:
            raise BadRecord("empty document")
        return {**doc, "tokens": tokens}
    obj = as_object(value)
    if source.score_field:
        _check_score(obj, source)
    if kind == "text":
        value = _get(obj, source.field)
        if isinstance(value, np.ndarray) and value.dtype.kind in "iu":  # e.g. a seqio token feature
            if value.size == 0:
                raise BadRecord("empty document")
            return {**doc, "tokens": value.astype(np.int32).reshape(-1)}
        return {**doc, "text": _text(obj, source.field)}
    if kind == "messages":
        if source.field not in obj and PROMPT in obj:
            messages = _turns(_get(obj, PROMPT), PROMPT, "user") + _turns(
                _get(obj, COMPLETION), COMPLETION, "assistant"
            )
        else:
            messages = _get(obj, source.field)
        chat.check_messages(messages)
        return {**doc, "messages": messages}
    if kind == "prompt":
        return {**doc, **_prompt(obj, source.field, required)}
    prompt_key, chosen_key, rejected_key = preference_keys(source)
    if prompt_key not in obj:
        return {**doc, **_implicit_prompt(obj, chosen_key, rejected_key)}
    prompt = _get(obj, prompt_key)
    if isinstance(prompt, list):
        chat.check_messages(prompt)
    elif not isinstance(prompt, str) or not prompt.strip():
        raise BadRecord(f"bad field: {prompt_key!r} is empty or not a string/messages")
    return {
        **doc,
        "prompt": prompt,
        "chosen": _response(obj, chosen_key),
        "rejected": _response(obj, rejected_key),
    }


def _prompt(obj: Mapping, key: str, required: Sequence[str]) -> dict:
    prompt = _get(obj, key)
    if isinstance(prompt, list):
        chat.check_messages(prompt)
    elif not isinstance(prompt, str) or not prompt.strip():
        raise BadRecord(f"bad field: {key!r} is empty or not a string/messages")
    for field in required:
        _get(obj, field)
    fields = {k: _plain(v) for k, v in obj.items() if k != key}
    return {"prompt": prompt, "fields": fields}


def _plain(value: Any) -> Any:
    """A record value as JSON would hold it (Parquet gives numpy arrays and bytes)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _implicit_prompt(obj: Mapping, chosen_key: str, rejected_key: str) -> dict:
    """TRL's implicit-prompt pair: the prompt is the longest common prefix of the two
    conversations; what follows it in each must be one assistant message."""
    chosen, rejected = _get(obj, chosen_key), _get(obj, rejected_key)
    for key, value in ((chosen_key, chosen), (rejected_key, rejected)):
        if not isinstance(value, list):
            raise BadRecord(f"bad field: {key!r} must be a messages list when there is no prompt")
        chat.check_messages(value)
    shared = 0
    while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == 0:
        raise BadRecord(f"bad field: {chosen_key!r} and {rejected_key!r} share no prompt")
    return {
        "prompt": list(chosen[:shared]),
        "chosen": _response(obj, chosen_key, shared),
        "rejected": _response(obj, rejected_key, shared),
    }


# A score range that selects nothing would otherwise skip records forever in an endless stream.
_MAX_SKIPPED_IN_A_ROW = 100_000


class ParseRecords:
    """Grain map: record -> document, or None (filtered out) after counting a bad record."""

    def __init__(
        self,
        sources: Mapping[str, Source],
        kind: str,
        tracker: BadRecordTracker,
        required: Sequence[str] = (),
    ):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self._sources = dict(sources)
        self._kind = kind
        self._required = tuple(required)
        self.tracker = tracker
        self._skipped: dict[str, int] = {}  # records out of score range since the last one read

    def __call__(self, record: Mapping) -> dict | None:
        name = record["source"]
        try:
            doc = parse(record, self._sources[name], self._kind, self._required)
        except BadRecord as e:
            self.tracker.bad(name, record["loc"], str(e))
            return None
        except OutOfScoreRange:
            self._skipped[name] = skipped = self._skipped.get(name, 0) + 1
            if skipped >= _MAX_SKIPPED_IN_A_ROW:
                source = self._sources[name]
                raise ValueError(
                    f"Source {name!r}: {skipped} records in a row have {source.score_field} "
                    f"outside [{source.min_score}, {source.max_score})"
                ) from None
            return None
        self._skipped[name] = 0
        self.tracker.good(name)
        return doc
