"""`python -m qwen_jax.data.prepare`: shards of token ids, a summary, and bad-input handling."""

import collections
import json
import subprocess
import sys

import numpy as np
import pytest

from qwen_jax.data import documents, prepare
from qwen_jax.data.bad_records import BadInputError
from qwen_jax.data.config import Source
from qwen_jax.data.sources import RecordSource
from qwen_jax.data.train_tokenizer import DEMO_TOKENIZER_PATH


def test_prepare_cli_writes_usable_shards(tmp_path, demo_dir, demo_tokenizer):
    texts = [json.loads(line)["text"] for line in open(demo_dir / "pretrain.jsonl")]
    (tmp_path / "extra.jsonl").write_text('{"text": "fine"}\n{broken\n')
    out = tmp_path / "prepared"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "qwen_jax.data.prepare",
            f"--input={demo_dir}/pretrain.jsonl",
            f"--input={tmp_path}/extra.jsonl",
            f"--output={out}",
            f"--tokenizer={DEMO_TOKENIZER_PATH}",
            "--workers=2",
            "--num_shards=2",
            "--chunk_size=100",
            "--max_bad_fraction=0.01",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert f"prepared {len(texts) + 1} documents" in result.stdout
    assert "skipped 1: {'malformed JSON': 1}" in result.stdout
    assert "100%" in result.stderr  # the progress bar
    meta = json.loads((out / "metadata.json").read_text())
    assert (meta["documents"], meta["skipped"], meta["num_shards"]) == (len(texts) + 1, 1, 2)
    # The shards are an ArrayRecord source holding exactly the tokenized documents.
    source = Source("prepared", str(out / "*.arrayrecord"), format="arrayrecord", field="tokens")
    records = RecordSource(source)
    got = collections.Counter(
        tuple(documents.parse(records[i], source, "text")["tokens"].tolist())
        for i in range(len(records))
    )
    expected = collections.Counter(
        tuple(ids) for ids in demo_tokenizer.encode_batch(texts + ["fine"])
    )
    assert got == expected
    assert meta["tokens"] == sum(len(k) * v for k, v in expected.items())


def test_prepare_fails_past_the_bad_fraction(tmp_path):
    lines = [json.dumps({"text": f"doc {i}"}) for i in range(50)] + ["{bad"] * 2 + ['{"text": ""}']
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(BadInputError, match=r"Source 'input': 3 of 53 records are bad"):
        prepare.prepare(
            [str(tmp_path / "in.jsonl")],
            str(tmp_path / "out"),
            DEMO_TOKENIZER_PATH,
            workers=1,
            progress=False,
        )
    # The summary is still written, so the failure explains itself.
    meta = json.loads((tmp_path / "out" / "metadata.json").read_text())
    assert meta["skipped_reasons"] == {"malformed JSON": 2, "empty document": 1}
    np.testing.assert_equal(meta["documents"], 50)
