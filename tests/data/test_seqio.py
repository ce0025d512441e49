"""A seqio Task defined here is a source of a pre-training mixture (skipped without seqio)."""

import collections

import pytest

seqio = pytest.importorskip("seqio")
tf = pytest.importorskip("tensorflow")

from qwen_jax.data import pipeline  # noqa: E402
from qwen_jax.data.bad_records import BadRecordTracker  # noqa: E402
from qwen_jax.data.config import DataStage, Source  # noqa: E402

TEXTS = [f"seqio document {i} says {i} + 1 = {i + 1}" for i in range(200)]


def _dataset_fn(split, shuffle_files, seed=None):
    del split, shuffle_files, seed
    return tf.data.Dataset.from_tensor_slices({"text": TEXTS})


@pytest.fixture(scope="module")
def task_name():
    name = "qwen_jax_test_task"
    if name not in seqio.TaskRegistry.names():
        seqio.TaskRegistry.add(
            name,
            source=seqio.FunctionDataSource(_dataset_fn, splits=["train"]),
            preprocessors=[],
            output_features={
                "text": seqio.Feature(
                    seqio.PassThroughVocabulary(1), dtype=tf.string, rank=0, add_eos=False
                )
            },
        )
    return name


def test_seqio_task_in_a_mixture(task_name, demo_dir, demo_tokenizer):
    sources = [
        Source("seqio", task_name, format="seqio", field="text"),
        Source("demo", str(demo_dir / "pretrain.jsonl")),
    ]
    stage = DataStage("s", None, 64, 4, {"seqio": 0.5, "demo": 0.5})
    tracker = BadRecordTracker({})
    docs = pipeline.document_dataset(
        sources,
        stage.mixture,
        "text",
        seed=0,
        shard_index=0,
        shard_count=1,
        num_epochs=None,
        shuffle=True,
        tracker=tracker,
    )
    it = iter(docs)
    seen = [next(it) for _ in range(100)]
    assert collections.Counter(d["source"] for d in seen) == {"seqio": 50, "demo": 50}
    assert all(d["text"] in TEXTS for d in seen if d["source"] == "seqio")
    state = it.get_state()
    after = [next(it)["text"] for _ in range(10)]
    it2 = iter(docs)
    it2.set_state(state)
    assert [next(it2)["text"] for _ in range(10)] == after
    batches = pipeline.pretrain_iterator(
        sources, [stage], demo_tokenizer, seed=0, shard_index=0, shard_count=1, prefetch=0
    )
    assert next(batches)["inputs"].shape == (4, 64)
