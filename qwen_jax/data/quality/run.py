"""The quality pipeline over a corpus: read, run the stages chunk by chunk, write shards, resume.

The input is read in order (files sorted by name, records in file order) and cut into chunks of
`chunk_size` records. Each chunk goes through every stage, and its kept records become
`OUTPUT/part-NNNNN.<format>`, its removed ones `OUTPUT/removed/part-NNNNN.<format>` with
`removed_by` (the rule), `reason` and `loc` (file:line). After each chunk the run's state (the
chunk count, the tallies, what each stage remembers, the scores so far) is written beside them,
every file by rename, so a run killed at any point resumes at the first chunk it had not
finished and writes what an uninterrupted run writes. When the last chunk is done, `report`
writes the summary and the histograms.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import pickle
import tempfile
import time
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging

from qwen_jax.data import sources as sources_lib
from qwen_jax.data.bad_records import BadRecord
from qwen_jax.data.config import Source
from qwen_jax.data.documents import as_object
from qwen_jax.data.quality import report
from qwen_jax.data.quality.stage import Document, Stage
from qwen_jax.parallel import host_data

OUTPUT_FORMATS = ("jsonl", "parquet")
REMOVED = "removed"
STATE_DIR = ".quality_state"
INPUT_RULE = "input/bad_record"


@dataclasses.dataclass
class QualityConfig:
    """One quality run.

    Attributes:
      input: glob patterns (or paths) of JSONL (plain, .gz, .zst), Parquet or ArrayRecord files.
      output: the directory the kept shards, `removed/`, `report/` and `summary.json` go to.
      stages: the stages, in order (dedup, heuristics, model_scores).
      text_field: the record field holding the document's text.
      output_format: 'jsonl' or 'parquet'.
      chunk_size: records per chunk; a chunk is the unit of output shards and of resumption.
    """

    input: Sequence[str] | str
    output: str
    stages: Sequence[Stage]
    text_field: str = "text"
    output_format: str = "jsonl"
    chunk_size: int = 10_000

    def __post_init__(self):
        if self.output_format not in OUTPUT_FORMATS:
            raise ValueError(
                f"output_format must be one of {OUTPUT_FORMATS}, got {self.output_format!r}"
            )
        if self.chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive, got {self.chunk_size}")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique, got {names}")

    def identity(self, paths: Sequence[str]) -> str:
        """What a resumed run must share with the one it continues."""
        return repr(
            (
                list(paths),
                self.text_field,
                self.output_format,
                self.chunk_size,
                [repr(s) for s in self.stages],
            )
        )


def _input_files(patterns: Sequence[str] | str) -> list[str]:
    source = Source("input", patterns)
    return sources_lib.resolve_paths(source)


def _file_records(path: str) -> sources_lib.RecordSource:
    source = Source("input", [path], format=sources_lib.format_of(path))
    return sources_lib.RecordSource(source, paths=[path])


def _records(paths: Sequence[str]) -> Iterator[tuple[str, Any]]:
    """(location, raw record) of every input record, file after file."""
    for path in paths:
        records = _file_records(path)
        for i in range(len(records)):
            item = records[i]
            yield item["loc"], item["value"]


def _check_text_field(paths: Sequence[str], text_field: str) -> None:
    """Fails, naming the file and the fields it has, when a file's first record (if it parses)
    has no `text_field`: a wrong field name would otherwise remove every document."""
    for path in paths:
        for loc, value in _file_records(path).first_records():
            try:
                obj = as_object(value)
            except BadRecord:
                continue
            if text_field not in obj:
                raise ValueError(
                    f"{loc}: no field {text_field!r} (the record has {sorted(obj)}); set TEXT_FIELD"
                )


def _document(loc: str, value: Any, text_field: str) -> Document:
    obj = dict(as_object(value))
    text = obj.get(text_field)
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    if not isinstance(text, str):
        raise BadRecord(
            f"missing field: {text_field!r}"
            if text is None
            else f"bad field: {text_field!r} is {type(text).__name__}, not a string"
        )
    if not text.strip():
        raise BadRecord("empty document")
    return Document(obj, text, loc)


def _bad(loc: str, value: Any, reason: str) -> Document:
    raw = (
        bytes(value).decode("utf-8", errors="replace")
        if isinstance(value, (bytes, bytearray))
        else repr(value)
    )
    doc = Document({"raw": raw}, "", loc)
    doc.remove(INPUT_RULE, reason)
    return doc


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.generic,)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


def _write_atomic(path: str, write) -> None:
    """Writes through `write(temporary path)` and renames, so a reader never sees half a file."""
    directory = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the shards from other users
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_records(path: str, records: list[dict], output_format: str) -> None:
    def write(tmp: str) -> None:
        if output_format == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            try:
                # Every field of any record (from_pylist would take the first record's only).
                keys = list(dict.fromkeys(k for record in records for k in record))
                table = pa.Table.from_pydict({k: [r.get(k) for r in records] for k in keys})
            except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
                raise ValueError(
                    f"{path}: cannot write Parquet: {_mixed_types(records) or e}"
                ) from None
            pq.write_table(table, tmp)
        else:
            with open(tmp, "w", encoding="utf-8") as f:
                for record in records:
                    f.write(json.dumps(record, ensure_ascii=False, default=_json_default) + "\n")

    _write_atomic(path, write)


def _mixed_types(records: list[dict]) -> str:
    """Names the fields whose values have more than one type (Parquet columns have one)."""
    types: dict[str, set[str]] = collections.defaultdict(set)
    for record in records:
        for key, value in record.items():
            if value is not None:
                types[key].add(type(value).__name__)
    mixed = {k: sorted(v) for k, v in types.items() if len(v) > 1}
    return "; ".join(
        f"field {k!r} holds {' and '.join(v)} values (write JSONL, or make the inputs agree)"
        for k, v in mixed.items()
    )


@dataclasses.dataclass
class Tally:
    """What the run has counted so far (part of the resumable state)."""

    chunks: int = 0
    documents: int = 0
    kept: int = 0
    by_rule: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    stage_seen: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    stage_removed: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    stage_seconds: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    scores: dict[str, list[float]] = dataclasses.field(default_factory=dict)


def _state_path(output: str, number: int) -> str:
    return os.path.join(output, STATE_DIR, f"chunk-{number:05d}.pkl")


def _load_state(config: QualityConfig, identity: str) -> Tally:
    """The tally after the last finished chunk, with every stage's memory rebuilt; a new tally
    for a new run."""
    state_dir = os.path.join(config.output, STATE_DIR)
    if not os.path.isdir(state_dir):
        leftovers = [n for n in os.listdir(config.output) if not n.startswith(".")]
        if leftovers:
            raise ValueError(
                f"OUTPUT {config.output} is not empty and holds no quality run to resume: "
                f"choose an empty directory"
            )
        return Tally()
    saved = []
    while os.path.exists(_state_path(config.output, len(saved))):
        with open(_state_path(config.output, len(saved)), "rb") as f:
            saved.append(pickle.load(f))
        if saved[-1]["identity"] != identity:
            raise ValueError(
                f"OUTPUT {config.output} holds a quality run of other input or stages: "
                f"choose another directory"
            )
    if not saved:
        return Tally()
    for i, stage in enumerate(config.stages):
        stage.restore([chunk["stages"][i] for chunk in saved])
    tally = saved[-1]["tally"]
    for chunk in saved:
        for field, values in chunk["scores"].items():
            tally.scores.setdefault(field, []).extend(values)
    return tally


def _save_state(config: QualityConfig, identity: str, tally: Tally, scores: dict) -> None:
    """The chunk's part of the state: what each stage added, the tally, the chunk's scores."""
    state = {
        "identity": identity,
        "stages": [s.chunk_state() for s in config.stages],
        "tally": dataclasses.replace(tally, scores={}),
        "scores": scores,
    }

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            pickle.dump(state, f, protocol=pickle.HIGHEST_PROTOCOL)

    _write_atomic(_state_path(config.output, tally.chunks - 1), write)


def _chunks(records: Iterator[tuple[str, Any]], size: int) -> Iterator[list[tuple[str, Any]]]:
    chunk = []
    for item in records:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def process_chunk(
    config: QualityConfig, items: list[tuple[str, Any]], tally: Tally
) -> tuple[list[Document], dict[str, list[float]]]:
    """Runs every stage over one chunk's records, counting into `tally`; (documents, the
    chunk's scores by field)."""
    scores: dict[str, list[float]] = {}
    docs = []
    for loc, value in items:
        try:
            docs.append(_document(loc, value, config.text_field))
        except BadRecord as e:
            docs.append(_bad(loc, value, str(e)))
    for stage in config.stages:
        live = [d for d in docs if d.removed is None]
        started = time.perf_counter()
        stage.process(live)
        tally.stage_seconds[stage.name] += time.perf_counter() - started
        tally.stage_seen[stage.name] += len(live)
        tally.stage_removed[stage.name] += sum(d.removed is not None for d in live)
        for field in stage.score_fields():
            values = [d.record[field] for d in live if field in d.record]
            scores.setdefault(field, []).extend(float(v) for v in values)
    for doc in docs:
        if doc.removed is not None:
            tally.by_rule[doc.removed[0]] += 1
    tally.documents += len(docs)
    tally.kept += sum(d.removed is None for d in docs)
    for field, values in scores.items():
        tally.scores.setdefault(field, []).extend(values)
    return docs, scores


def run_pipeline(config: QualityConfig, placement: host_data.Placement | None = None) -> dict:
    """Runs (or resumes) the quality run; returns the summary `report.write` wrote."""
    paths = _input_files(config.input)
    _check_text_field(paths, config.text_field)
    identity = config.identity(paths)
    primary = jax.process_index() == 0
    for stage in config.stages:  # a missing model fails before anything is written
        stage.open(placement)
    os.makedirs(config.output, exist_ok=True)
    tally = _load_state(config, identity)
    for directory in (REMOVED, STATE_DIR):
        os.makedirs(os.path.join(config.output, directory), exist_ok=True)
    records = _records(paths)
    for number, items in enumerate(_chunks(records, config.chunk_size)):
        if number < tally.chunks:
            continue  # written before the run was stopped
        started = time.perf_counter()
        docs, scores = process_chunk(config, items, tally)
        tally.chunks = number + 1
        if primary:
            name = f"part-{number:05d}.{config.output_format}"
            kept = [d.record for d in docs if d.removed is None]
            removed = [
                {**d.record, "removed_by": d.removed[0], "reason": d.removed[1], "loc": d.loc}
                for d in docs
                if d.removed is not None
            ]
            if kept:
                write_records(os.path.join(config.output, name), kept, config.output_format)
            if removed:
                write_records(
                    os.path.join(config.output, REMOVED, name), removed, config.output_format
                )
            _save_state(config, identity, tally, scores)
        seconds = time.perf_counter() - started
        logging.info(
            "chunk %d: %d records, %d kept, %.1f s (%.0f docs/s)",
            number,
            len(docs),
            sum(d.removed is None for d in docs),
            seconds,
            len(docs) / max(seconds, 1e-9),
        )
    summary = report.summarize(config, tally)
    if primary:
        report.write(config.output, summary, tally.scores)
    return summary
