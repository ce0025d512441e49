r"""Pre-tokenizes text into ArrayRecord shards of token ids.

  python -m qwen_jax.data.prepare --input='/data/web/*.jsonl.zst' --output=/data/web_tok \
      --tokenizer=tokenizer.json [--field=text] [--workers=N] [--num_shards=N]

Each output record is one document's ids as little-endian uint32 (no separator: the pipelines
frame documents with <|endoftext|> when packing). The shards are read back as
`Source(name, paths=[OUTPUT + '/*.arrayrecord'], format='arrayrecord', field='tokens')`.
`metadata.json` beside them records the tokenizer and the counts. Work is split into chunks of
records that worker processes read, parse and tokenize; the main process writes chunks in input
order, so the output does not depend on the number of workers.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys

from absl import app, flags
from array_record.python import array_record_module
import numpy as np
import tqdm

from qwen_jax.data import documents
from qwen_jax.data.bad_records import BadRecord, BadRecordTracker
from qwen_jax.data.config import Source
from qwen_jax.data.sources import RecordSource, resolve_paths
from qwen_jax.data.tokenizer import Tokenizer

_worker: dict = {}


def _init_worker(source: Source, tokenizer_path: str) -> None:
    # One process per core already: a second level of threads in the tokenizer would oversubscribe.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker["records"] = RecordSource(source, documents.columns(source, "text"))
    _worker["source"] = source
    _worker["tokenizer"] = Tokenizer.from_file(tokenizer_path)


def _tokenize_chunk(bounds: tuple[int, int]) -> tuple[list[bytes], list[tuple[str, str]], int]:
    """Records [start, end) -> (token records, bad (location, reason) pairs, tokens)."""
    records, source = _worker["records"], _worker["source"]
    texts, bad = [], []
    for i in range(*bounds):
        try:
            doc = documents.parse(records[i], source, "text")
        except BadRecord as e:
            bad.append((records[i]["loc"], str(e)))
            continue
        texts.append(doc["tokens"] if "tokens" in doc else doc["text"])
    strings = [t for t in texts if isinstance(t, str)]
    encoded = iter(_worker["tokenizer"].encode_batch(strings))
    out = [
        np.asarray(t if not isinstance(t, str) else next(encoded), documents.TOKEN_DTYPE)
        for t in texts
    ]
    return [a.tobytes() for a in out], bad, int(sum(a.size for a in out))


def _infer_format(paths: list[str]) -> str:
    first = paths[0]
    if first.endswith(".parquet"):
        return "parquet"
    if first.endswith(".arrayrecord") or ".array_record" in first:
        return "arrayrecord"
    return "jsonl"


def prepare(
    inputs: list[str],
    output: str,
    tokenizer_path: str,
    *,
    field: str = "text",
    fmt: str | None = None,
    workers: int | None = None,
    num_shards: int | None = None,
    chunk_size: int = 512,
    max_bad_fraction: float = 0.01,
    progress: bool = True,
) -> dict:
    """Tokenizes `inputs` into shards under `output`; returns the summary written to
    metadata.json. Raises BadInputError past `max_bad_fraction`."""
    name = "input"
    fmt = fmt or _infer_format(resolve_paths(Source(name, inputs)))
    source = Source(name, inputs, format=fmt, field=field, max_bad_fraction=max_bad_fraction)
    total = len(RecordSource(source, documents.columns(source, "text")))
    num_shards = num_shards or max(1, -(-total // 100_000))
    os.makedirs(output, exist_ok=True)
    writers = [
        array_record_module.ArrayRecordWriter(
            os.path.join(output, f"tokens-{i:05d}-of-{num_shards:05d}.arrayrecord"), "group_size:1"
        )
        for i in range(num_shards)
    ]
    chunks = [(s, min(s + chunk_size, total)) for s in range(0, total, chunk_size)]
    tracker = BadRecordTracker({name: max_bad_fraction}, min_records=total + 1)
    documents_written, tokens = 0, 0
    ctx = multiprocessing.get_context("spawn")
    with (
        ctx.Pool(
            workers or os.cpu_count(), initializer=_init_worker, initargs=(source, tokenizer_path)
        ) as pool,
        tqdm.tqdm(total=total, unit="doc", disable=not progress, file=sys.stderr) as bar,
    ):
        for (start, end), (encoded, bad, n_tokens) in zip(
            chunks, pool.imap(_tokenize_chunk, chunks)
        ):
            for record in encoded:
                # Round-robin over shards keeps them equally sized and mixes every input file in.
                writers[documents_written % num_shards].write(record)
                documents_written += 1
            for location, reason in bad:
                tracker.bad(name, location, reason)
            tracker.good(name, len(encoded))
            tokens += n_tokens
            bar.update(end - start)
    for writer in writers:
        writer.close()
    tally = tracker.tallies[name]
    summary = {
        "inputs": list(inputs),
        "format": fmt,
        "field": field,
        "tokenizer": os.path.abspath(tokenizer_path),
        "vocab_size": Tokenizer.from_file(tokenizer_path).vocab_size,
        "dtype": "uint32",
        "num_shards": num_shards,
        "records": total,
        "documents": documents_written,
        "tokens": tokens,
        "skipped": tally.bad,
        "skipped_reasons": dict(tally.reasons),
    }
    with open(os.path.join(output, "metadata.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    print(
        f"prepared {documents_written} documents, {tokens} tokens into {num_shards} shards "
        f"under {output}; skipped {tally.bad}: {dict(tally.reasons) or 'none'}"
    )
    tracker.finish()  # after writing the summary, so a failed run still explains itself
    return summary


def _define_flags() -> None:
    flags.DEFINE_multi_string("input", None, "Input glob(s).", required=True)
    flags.DEFINE_string("output", None, "Output directory.", required=True)
    flags.DEFINE_string("tokenizer", None, "Path of a tokenizer.json.", required=True)
    flags.DEFINE_string("field", "text", "Record key holding the text.")
    flags.DEFINE_enum(
        "format",
        None,
        ["jsonl", "parquet", "arrayrecord"],
        "Input format; by default from the first file's suffix.",
    )
    flags.DEFINE_integer("workers", None, "Worker processes (default: all cores).")
    flags.DEFINE_integer("num_shards", None, "Output shards (default: one per ~100k documents).")
    flags.DEFINE_integer("chunk_size", 512, "Records per unit of work.")
    flags.DEFINE_float(
        "max_bad_fraction", 0.01, "Fail when more than this fraction of records is bad."
    )


def main(argv) -> int:
    from qwen_jax import cli

    f = flags.FLAGS
    options = ("field", "workers", "num_shards", "chunk_size", "max_bad_fraction")
    return cli.run(
        lambda: prepare(
            f.input, f.output, f.tokenizer, fmt=f.format, **{o: f[o].value for o in options}
        ),
        argv,
    )


if __name__ == "__main__":
    _define_flags()  # only as a program: importing the module defines no flags
    app.run(lambda argv: sys.exit(main(argv)))
