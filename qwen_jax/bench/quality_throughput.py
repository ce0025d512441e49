"""Documents per second of deduplication and heuristic filters: qwen_jax's stages beside
datatrove's (MinHash deduplication; Gopher and C4 filters) on the same JSONL corpus, in one run.

    python -m qwen_jax.bench.quality_throughput --scale=3 --workdir=/tmp/quality_throughput

The corpus is the demo's noisy pre-training text (`demo_corpus.noisy_pretrain_docs`), `--scale`
times the demo's size. qwen_jax runs `python -m qwen_jax.data.quality`'s pipeline in this
process (one core); datatrove runs its documented four-step MinHash pipeline (signatures,
buckets, clusters, filter) and its filter pipeline with `LocalPipelineExecutor`, one worker at a
time. Each line gives wall-clock seconds from reading to written output, documents per second
and how many documents were removed. datatrove's side needs the `datatrove` extra.
"""

from __future__ import annotations

import os
import shutil
import time

from absl import app, flags

from qwen_jax import cli

SCALE = flags.DEFINE_float("scale", 3.0, "corpus size as a multiple of the demo's")
WORKDIR = flags.DEFINE_string("workdir", "/tmp/quality_throughput", "corpus and outputs")


def _timed(work) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def _report(name: str, documents: int, seconds: float, removed: int) -> None:
    print(
        f"{name:42s} {seconds:8.2f} s {documents / seconds:9.0f} docs/s  removed {removed}",
        flush=True,
    )


def ours(corpus: str, output: str, stages) -> tuple[float, dict]:
    from qwen_jax.data.quality import run

    config = run.QualityConfig(input=corpus, output=output, stages=stages)
    summary = {}
    seconds = _timed(lambda: summary.update(run.run_pipeline(config)))
    return seconds, summary


def datatrove_minhash(corpus: str, directory: str) -> tuple[float, int]:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import (
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    config = MinhashConfig()  # 5-grams, 14 buckets x 8 hashes
    folder, name = os.path.split(corpus)

    def reader():
        return JsonlReader(folder, glob_pattern=name, text_key="text")

    def execute(pipeline, tasks=1):
        LocalPipelineExecutor(
            pipeline,
            tasks=tasks,
            workers=1,
            logging_dir=os.path.join(directory, f"logs{len(os.listdir(directory))}"),
        ).run()

    def everything():
        execute([reader(), MinhashDedupSignature(f"{directory}/signatures", config=config)])
        execute(
            [MinhashDedupBuckets(f"{directory}/signatures", f"{directory}/buckets", config=config)],
            tasks=config.num_buckets,
        )
        execute([MinhashDedupCluster(f"{directory}/buckets", f"{directory}/remove", config=config)])
        execute(
            [
                reader(),
                MinhashDedupFilter(
                    f"{directory}/remove", exclusion_writer=JsonlWriter(f"{directory}/removed")
                ),
                JsonlWriter(f"{directory}/kept"),
            ]
        )

    seconds = _timed(everything)
    return seconds, _count_lines(f"{directory}/removed")


def datatrove_filters(corpus: str, directory: str) -> tuple[float, int]:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.filters import (
        C4QualityFilter,
        GopherQualityFilter,
        GopherRepetitionFilter,
    )
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    folder, name = os.path.split(corpus)
    removed = f"{directory}/removed"
    pipeline = [
        JsonlReader(folder, glob_pattern=name, text_key="text"),
        GopherRepetitionFilter(exclusion_writer=JsonlWriter(f"{removed}/repetition")),
        GopherQualityFilter(exclusion_writer=JsonlWriter(f"{removed}/quality")),
        C4QualityFilter(exclusion_writer=JsonlWriter(f"{removed}/c4")),
        JsonlWriter(f"{directory}/kept"),
    ]
    seconds = _timed(
        lambda: LocalPipelineExecutor(
            pipeline, tasks=1, workers=1, logging_dir=f"{directory}/logs"
        ).run()
    )
    return seconds, _count_lines(removed)


def _count_lines(directory: str) -> int:
    import gzip

    total = 0
    for root, _, names in os.walk(directory):
        for name in names:
            opener = gzip.open if name.endswith(".gz") else open
            with opener(os.path.join(root, name), "rt") as f:
                total += sum(1 for _ in f)
    return total


def bench() -> None:
    from qwen_jax.data import demo_corpus
    from qwen_jax.data.quality import dedup, heuristics

    root = os.path.abspath(WORKDIR.value)
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    clean = demo_corpus.demo_records("pretrain.jsonl", seed=0, scale=SCALE.value)
    corpus = os.path.join(root, "corpus.jsonl")
    docs = list(demo_corpus.noisy_pretrain_docs(8, clean))
    for i, doc in enumerate(docs):
        doc["id"] = str(i)
    demo_corpus.write_jsonl(corpus, docs)
    print(f"corpus: {len(docs)} documents ({corpus})")

    seconds, summary = ours(
        corpus, os.path.join(root, "ours_dedup"), [dedup.ExactDedup(), dedup.NearDedup()]
    )
    _report("qwen_jax exact + MinHash-LSH dedup", len(docs), seconds, summary["removed"])
    rules = [heuristics.GopherRepetition(), heuristics.GopherQuality(), heuristics.C4Rules()]
    seconds, summary = ours(corpus, os.path.join(root, "ours_rules"), rules)
    _report("qwen_jax Gopher + C4 rules", len(docs), seconds, summary["removed"])
    try:
        import datatrove  # noqa: F401
    except ImportError:
        print("datatrove: not installed (pip install -e '.[datatrove]')")
        return
    os.makedirs(os.path.join(root, "datatrove_dedup"))
    seconds, removed = datatrove_minhash(corpus, os.path.join(root, "datatrove_dedup"))
    _report("datatrove MinHash dedup (4 steps)", len(docs), seconds, removed)
    seconds, removed = datatrove_filters(corpus, os.path.join(root, "datatrove_rules"))
    _report("datatrove Gopher + C4 filters", len(docs), seconds, removed)


if __name__ == "__main__":
    app.run(lambda argv: cli.run(bench, argv))
