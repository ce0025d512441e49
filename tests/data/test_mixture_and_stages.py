"""Weighted mixtures, the stage schedule, and the shipped gin data configs."""

import collections
import json
import os

import gin
import pytest

from qwen_jax.data import pipeline
from qwen_jax.data.bad_records import BadRecordTracker
from qwen_jax import configurables
from qwen_jax.data.config import DataStage, Source

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_realized_mixture_is_within_two_percent(demo_dir):
    sources = [
        Source("text", str(demo_dir / "pretrain.jsonl")),
        Source("long", str(demo_dir / "long_docs.jsonl")),
        Source("chatty", str(demo_dir / "pretrain_eval.jsonl")),
    ]
    weights = {"text": 0.55, "long": 0.30, "chatty": 0.15}
    docs = pipeline.document_dataset(
        sources,
        weights,
        "text",
        seed=0,
        shard_index=0,
        shard_count=1,
        num_epochs=None,
        shuffle=True,
        tracker=BadRecordTracker({}),
    )
    it = iter(docs)
    n = 10_000
    counts = collections.Counter(next(it)["source"] for _ in range(n))
    for name, weight in weights.items():
        assert abs(counts[name] / n - weight) <= 0.02, (name, counts)


def test_stage_switch_happens_at_the_configured_step(demo_dir, demo_tokenizer):
    sources = [
        Source("text", str(demo_dir / "pretrain.jsonl")),
        Source("long", str(demo_dir / "long_docs.jsonl")),
    ]
    stages = [
        DataStage("short", 5, 32, 8, {"text": 1.0}),
        DataStage("long", 3, 96, 4, {"text": 0.2, "long": 0.8}),
    ]
    it = pipeline.pretrain_iterator(
        sources, stages, demo_tokenizer, seed=0, shard_index=1, shard_count=2, prefetch=0
    )
    shapes, names = [], []
    for _ in range(8):
        names.append(it.stage.name)
        shapes.append(next(it)["inputs"].shape)
    assert names == ["short"] * 5 + ["long"] * 3
    assert shapes == [(4, 32)] * 5 + [(2, 96)] * 3  # per-host batch: global batch / 2 hosts
    assert it.step == 8
    with pytest.raises(StopIteration):
        next(it)


def test_stage_config_errors(demo_dir, demo_tokenizer):
    sources = [Source("text", str(demo_dir / "pretrain.jsonl"))]
    with pytest.raises(ValueError, match="unknown sources \\['web'\\]"):
        pipeline.pretrain_iterator(sources, [DataStage("s", 1, 8, 2, {"web": 1})], demo_tokenizer)
    with pytest.raises(ValueError, match="not divisible by 3 hosts"):
        pipeline.pretrain_iterator(
            sources,
            [DataStage("s", 1, 8, 4, {"text": 1})],
            demo_tokenizer,
            shard_index=0,
            shard_count=3,
        )


# The shipped pre-training recipes, with a placeholder for each value the user binds.
RECIPES = {
    "configs/pretrain/full.gin": [
        *(f"{m} = 'x.jsonl'" for m in ("WEB", "CODE", "MATH", "BOOKS", "INSTRUCT", "LONG")),
        *(f"{m} = 10" for m in ("STAGE1_STEPS", "STAGE2_STEPS", "ANNEAL_STEPS", "STABLE_STEPS")),
    ],
    "configs/demo/pretrain.gin": [
        f"{m} = 'x.jsonl'" for m in ("PRETRAIN_TEXT", "LONG_TEXT", "PRETRAIN_EVAL_TEXT")
    ],
}


@pytest.mark.parametrize("path", sorted(RECIPES))
def test_shipped_gin_data_configs_parse(path):
    gin.clear_config()
    try:
        gin.add_config_file_search_path(REPO)
        gin.parse_config_files_and_bindings([os.path.join(REPO, path)], RECIPES[path])
        task = configurables.RunConfig().task
        sources, stages = {s.name: s for s in task.sources}, task.stages
    finally:
        gin.clear_config()
    assert stages and sources
    for stage in stages:
        assert set(stage.mixture) <= set(sources)
        assert abs(sum(stage.mixture.values()) - 1.0) < 1e-6, stage


def test_score_buckets_select_by_score_and_mix_by_weight(tmp_path):
    """Sources over the same scored shards with adjacent score ranges are buckets: each reads
    only its range (records outside are skipped, not bad; a record without the score is bad),
    and the mixture weights them."""
    path = tmp_path / "scored.jsonl"
    records = [{"text": f"doc {i}", "quality_rating": (i % 50) / 10} for i in range(1000)]
    records.append({"text": "unscored"})
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    high = Source("high", str(path), score_field="quality_rating", min_score=3.0)
    low = Source("low", str(path), score_field="quality_rating", max_score=3.0)
    tracker = BadRecordTracker({"high": 0.01, "low": 0.01})
    finite = dict(seed=0, shard_index=0, shard_count=1, shuffle=False, tracker=tracker)
    read = {
        s.name: list(pipeline.document_dataset([s], None, "text", num_epochs=1, **finite))
        for s in (high, low)
    }
    rating = {r["text"]: r.get("quality_rating") for r in records}
    assert len(read["high"]) == 400 and all(rating[d["text"]] >= 3.0 for d in read["high"])
    assert len(read["low"]) == 600 and all(rating[d["text"]] < 3.0 for d in read["low"])
    assert tracker.scalars()["high/bad"] == tracker.scalars()["low/bad"] == 1  # no score
    weights = {"high": 0.8, "low": 0.2}
    mixed = iter(pipeline.document_dataset([high, low], weights, "text", num_epochs=None, **finite))
    counts = collections.Counter(next(mixed)["source"] for _ in range(5000))
    assert abs(counts["high"] / 5000 - 0.8) <= 0.02, counts


def test_score_range_needs_a_score_field():
    with pytest.raises(ValueError, match="score_field and a min_score"):
        Source("s", "x.jsonl", min_score=3.0)
