"""Turns raw records into documents, rejecting (and counting) the ones that cannot be used.

A document is one of: `{"text": str}` or `{"tokens": int array}` (pre-training),
`{"messages": [...]}` (SFT), `{"prompt": str | messages, "chosen": str, "rejected": str}` (DPO),
each with its `"source"` and `"loc"`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np

from qwen_jax.data import chat
from qwen_jax.data.bad_records import BadRecord, BadRecordTracker
from qwen_jax.data.config import Source

TOKEN_DTYPE = np.dtype("<u4")  # prepared ArrayRecord shards: little-endian uint32 ids

KINDS = ("text", "messages", "preference")


def preference_keys(source: Source) -> list[str]:
  keys = source.field.split("/")
  if len(keys) != 3:
    raise ValueError(f"Source {source.name!r}: a preference source needs field='prompt/chosen/"
                     f"rejected' (three keys joined by '/'), got {source.field!r}")
  return keys


def columns(source: Source, kind: str) -> list[str]:
  """The record keys a document of `kind` needs (Parquet reads only these columns)."""
  return preference_keys(source) if kind == "preference" else [source.field]


def _as_object(value: Any) -> Mapping:
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


def _response(obj: Mapping, key: str) -> str:
  """A DPO response: a string, or a messages list whose last message is the assistant's."""
  value = _get(obj, key)
  if isinstance(value, list):
    chat._check_messages(value)  # pylint: disable=protected-access
    if value[-1]["role"] != "assistant":
      raise BadRecord(f"bad field: {key!r} does not end with an assistant message")
    value = value[-1]["content"]
  if not isinstance(value, str):
    raise BadRecord(f"bad field: {key!r} is {type(value).__name__}")
  if not value.strip():
    raise BadRecord(f"empty document: {key!r} is empty")
  return value


def parse(record: Mapping, source: Source, kind: str) -> dict:
  """The document in `record`, or BadRecord with the reason."""
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
  obj = _as_object(value)
  if kind == "text":
    value = _get(obj, source.field)
    if isinstance(value, np.ndarray) and value.dtype.kind in "iu":  # e.g. a seqio token feature
      if value.size == 0:
        raise BadRecord("empty document")
      return {**doc, "tokens": value.astype(np.int32).reshape(-1)}
    return {**doc, "text": _text(obj, source.field)}
  if kind == "messages":
    messages = _get(obj, source.field)
    chat._check_messages(messages)  # pylint: disable=protected-access
    return {**doc, "messages": messages}
  prompt_key, chosen_key, rejected_key = preference_keys(source)
  prompt = _get(obj, prompt_key)
  if isinstance(prompt, list):
    chat._check_messages(prompt)  # pylint: disable=protected-access
  elif not isinstance(prompt, str) or not prompt.strip():
    raise BadRecord(f"bad field: {prompt_key!r} is empty or not a string/messages")
  return {**doc, "prompt": prompt, "chosen": _response(obj, chosen_key),
          "rejected": _response(obj, rejected_key)}


class ParseRecords:
  """Grain map: record -> document, or None (filtered out) after counting a bad record."""

  def __init__(self, sources: Mapping[str, Source], kind: str, tracker: BadRecordTracker):
    if kind not in KINDS:
      raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    self._sources = dict(sources)
    self._kind = kind
    self.tracker = tracker

  def __call__(self, record: Mapping) -> dict | None:
    name = record["source"]
    try:
      doc = parse(record, self._sources[name], self._kind)
    except BadRecord as e:
      self.tracker.bad(name, record["loc"], str(e))
      return None
    self.tracker.good(name)
    return doc
