r"""Input-pipeline throughput beside the bare tokenizer's, measured in one run on the same cores.

  python -m qwen_jax.bench.data [--tokenizer=PATH] [--docs=4000] [--seq_len=2048]
      [--batch_size=8] [--workers=0] [--packing=first_fit]

Both figures are tokens per second over the same documents: first `encode_batch` on the raw
texts (the tokenizer alone, all cores), then the pre-training pipeline end to end (read JSONL,
parse, tokenize, pack, batch), counting the non-padding tokens of its batches. Uses the Qwen2.5
tokenizer from ../shared when present, else the demo tokenizer.
"""

from __future__ import annotations

import json
import os
import pathlib
import random
import sys
import tempfile
import time

from absl import app, flags

from qwen_jax import cli
from qwen_jax.data import demo_corpus, pipeline
from qwen_jax.data.config import DataStage, Source
from qwen_jax.data.tokenizer import Tokenizer
from qwen_jax.data.train_tokenizer import DEMO_TOKENIZER_PATH

_QWEN = (
    pathlib.Path(__file__).resolve().parents[2].parent
    / "shared"
    / "tokenizers"
    / "qwen2.5"
    / "tokenizer.json"
)


def default_tokenizer_path() -> str:
    return str(_QWEN) if _QWEN.exists() else DEMO_TOKENIZER_PATH


def bench_documents(n: int, seed: int = 0) -> list[str]:
    """Web-like documents of a few hundred to a few thousand characters (demo long docs, with
    prose-like variety so the tokenizer does real merging work)."""
    rng = random.Random(seed)
    world = demo_corpus.make_world(seed)
    docs = [d["text"] for d in demo_corpus.long_docs(seed, n, world)]
    words = " ".join(docs[:50]).split()
    return [d + " " + " ".join(rng.choice(words) for _ in range(rng.randint(0, 400))) for d in docs]


def measure_encode_batch(tokenizer: Tokenizer, texts: list[str]) -> tuple[float, int]:
    tokenizer.encode_batch(texts[:256])  # warm the thread pool
    start = time.perf_counter()
    tokens = sum(len(ids) for ids in tokenizer.encode_batch(texts))
    return time.perf_counter() - start, tokens


def measure_pipeline(
    tokenizer: Tokenizer,
    path: str,
    tokens_goal: int,
    *,
    seq_len: int,
    batch_size: int,
    workers: int,
    packing: str,
) -> tuple[float, int]:
    it = pipeline.pretrain_iterator(
        [Source("bench", path)],
        [DataStage("bench", None, seq_len, batch_size, {"bench": 1})],
        tokenizer,
        seed=0,
        packing=packing,
        shard_index=0,
        shard_count=1,
        worker_count=workers,
    )
    next(it)  # start-up (file index, worker processes) is not throughput
    start = time.perf_counter()
    tokens = 0
    while tokens < tokens_goal:
        batch = next(it)
        tokens += int((batch["segment_ids"] > 0).sum())
    elapsed = time.perf_counter() - start
    it.close()
    return elapsed, tokens


def run(
    tokenizer_path: str, num_docs: int, seq_len: int, batch_size: int, workers: int, packing: str
) -> dict:
    tokenizer = Tokenizer.from_file(tokenizer_path)
    texts = bench_documents(num_docs)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bench.jsonl")
        demo_corpus.write_jsonl(path, ({"text": t} for t in texts))
        enc_time, enc_tokens = measure_encode_batch(tokenizer, texts)
        pipe_time, pipe_tokens = measure_pipeline(
            tokenizer,
            path,
            enc_tokens,
            seq_len=seq_len,
            batch_size=batch_size,
            workers=workers,
            packing=packing,
        )
    result = {
        "tokenizer": tokenizer_path,
        "cores": os.cpu_count(),
        "documents": num_docs,
        "encode_batch_tokens_per_s": enc_tokens / enc_time,
        "pipeline_tokens_per_s": pipe_tokens / pipe_time,
        "workers": workers,
        "packing": packing,
        "seq_len": seq_len,
        "batch_size": batch_size,
    }
    result["ratio"] = result["pipeline_tokens_per_s"] / result["encode_batch_tokens_per_s"]
    return result


def main() -> None:
    f = flags.FLAGS
    result = run(
        f.tokenizer or default_tokenizer_path(),
        f.docs,
        f.seq_len,
        f.batch_size,
        f.workers,
        f.packing,
    )
    print(f"tokenizer: {result['tokenizer']} ({result['cores']} cores, {result['documents']} docs)")
    print(
        f"encode_batch (tokenizer alone):       {result['encode_batch_tokens_per_s']:>12,.0f} "
        "tokens/s"
    )
    print(
        f"tokenize+pack+batch ({result['packing']}, workers={result['workers']}): "
        f"{result['pipeline_tokens_per_s']:>12,.0f} tokens/s"
    )
    print(f"ratio: {result['ratio']:.2f}x")
    print(json.dumps(result))


if __name__ == "__main__":
    flags.DEFINE_string(
        "tokenizer",
        None,
        "tokenizer.json (default: Qwen2.5's if present, else the demo tokenizer).",
    )
    flags.DEFINE_integer("docs", 4000, "Documents to tokenize.")
    flags.DEFINE_integer("seq_len", 2048, "Row length.")
    flags.DEFINE_integer("batch_size", 8, "Rows per batch.")
    flags.DEFINE_integer("workers", 0, "Grain worker processes.")
    flags.DEFINE_enum("packing", "first_fit", ["first_fit", "concat_split"], "Packer.")
    app.run(lambda argv: sys.exit(cli.run(main, argv)))
