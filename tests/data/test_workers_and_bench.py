"""Worker processes give the same kind of batches and resume; the benchmark runs end to end."""

import numpy as np

from qwen_jax.bench import data as bench
from qwen_jax.data import pipeline
from qwen_jax.data.config import DataStage, Source
from qwen_jax.data.train_tokenizer import DEMO_TOKENIZER_PATH


def test_worker_processes_resume(demo_dir, demo_tokenizer):
    def make():
        return pipeline.pretrain_iterator(
            [Source("text", str(demo_dir / "pretrain.jsonl"))],
            [DataStage("s", None, 64, 4, {"text": 1.0})],
            demo_tokenizer,
            seed=0,
            shard_index=0,
            shard_count=1,
            worker_count=2,
        )

    it = make()
    try:
        first = [next(it) for _ in range(3)]
        state = it.get_state()
        expected = [next(it) for _ in range(3)]
    finally:
        it.close()
    assert first[0]["inputs"].shape == (4, 64)
    fresh = make()
    try:
        fresh.set_state(state)
        for a, b in zip(expected, [next(fresh) for _ in range(3)]):
            np.testing.assert_array_equal(a["inputs"], b["inputs"])
    finally:
        fresh.close()


def test_bench_runs():
    result = bench.run(
        DEMO_TOKENIZER_PATH, num_docs=200, seq_len=256, batch_size=4, workers=0, packing="first_fit"
    )
    assert result["encode_batch_tokens_per_s"] > 0 and result["pipeline_tokens_per_s"] > 0
