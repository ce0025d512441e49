"""Readers for every format, glob patterns, and per-host sharding."""

import gzip
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from array_record.python import array_record_module

from qwen_jax.data import documents, sources
from qwen_jax.data.config import Source
from qwen_jax.data.sources import RecordSource, record_dataset

TEXTS = [f"document number {i}" for i in range(37)]


def write_all_formats(tmp_path):
    lines = "".join(json.dumps({"text": t}) + "\n" for t in TEXTS).encode()
    (tmp_path / "plain.jsonl").write_bytes(lines)
    with gzip.open(tmp_path / "packed.jsonl.gz", "wb") as f:
        f.write(lines)
    (tmp_path / "packed.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    pq.write_table(
        pa.table({"text": TEXTS, "other": list(range(len(TEXTS)))}),
        tmp_path / "table.parquet",
        row_group_size=10,
    )
    writer = array_record_module.ArrayRecordWriter(
        str(tmp_path / "records.arrayrecord"), "group_size:1"
    )
    for t in TEXTS:
        writer.write(json.dumps({"text": t}).encode())
    writer.close()


@pytest.mark.parametrize(
    "pattern,fmt",
    [
        ("plain.jsonl", "jsonl"),
        ("packed.jsonl.gz", "jsonl"),
        ("packed.jsonl.zst", "jsonl"),
        ("*.parquet", "parquet"),
        ("records.*", "arrayrecord"),
    ],
)
def test_every_format_reads_the_same_documents(tmp_path, monkeypatch, pattern, fmt):
    monkeypatch.setenv("QWEN_JAX_DATA_CACHE", str(tmp_path / "cache"))
    write_all_formats(tmp_path)
    source = Source("s", str(tmp_path / pattern), format=fmt)
    records = RecordSource(source, columns=["text"])
    assert len(records) == len(TEXTS)
    texts = [documents.parse(records[i], source, "text")["text"] for i in range(len(records))]
    assert texts == TEXTS
    assert records[4]["loc"].split("/")[-1] in (
        f"{pattern}:5",
        "table.parquet:row 4",
        "records.arrayrecord:record 4",
    )


def test_glob_over_several_files_and_missing_glob(tmp_path):
    for k in range(3):
        (tmp_path / f"part-{k}.jsonl").write_text(json.dumps({"text": f"t{k}"}) + "\n")
    records = RecordSource(Source("s", [str(tmp_path / "part-*.jsonl")]))
    assert [json.loads(records[i]["value"])["text"] for i in range(3)] == ["t0", "t1", "t2"]
    assert records[2]["loc"].endswith("part-2.jsonl:1")
    with pytest.raises(FileNotFoundError, match="Source 'x'.*nope"):
        RecordSource(Source("x", str(tmp_path / "nope-*.jsonl")))


def test_each_host_reads_only_its_own_shard(tmp_path):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    source = Source("s", str(tmp_path / "a.jsonl"))
    shards = []
    for index in range(4):
        ds = record_dataset(source, shard_index=index, shard_count=4, seed=1, num_epochs=1)
        shards.append({r["loc"] for r in ds})
    assert sum(len(s) for s in shards) == len(TEXTS)
    assert set().union(*shards) == {f"{tmp_path / 'a.jsonl'}:{i + 1}" for i in range(len(TEXTS))}
    # Epochs are reshuffled: two epochs of one shard hold the same records in another order.
    two = [
        r["loc"] for r in record_dataset(source, shard_index=0, shard_count=4, seed=1, num_epochs=2)
    ]
    half = len(two) // 2
    assert sorted(two[:half]) == sorted(two[half:]) and two[:half] != two[half:]


def test_with_enough_files_each_shard_opens_only_its_own(tmp_path, monkeypatch):
    for k in range(5):
        (tmp_path / f"part-{k}.jsonl").write_text(
            "".join(json.dumps({"text": f"{k}-{i}"}) + "\n" for i in range(3))
        )
    source = Source("s", str(tmp_path / "part-*.jsonl"))
    opened = []
    original = sources.JsonlFile.__init__

    def spy(self, path):
        opened.append(os.path.basename(path))
        original(self, path)

    monkeypatch.setattr(sources.JsonlFile, "__init__", spy)
    texts = []
    for index in range(2):
        opened.clear()
        ds = record_dataset(source, shard_index=index, shard_count=2, seed=0, num_epochs=1)
        texts.append(sorted(json.loads(r["value"])["text"] for r in ds))
        assert opened == [["part-0.jsonl", "part-1.jsonl"], ["part-2.jsonl", "part-3.jsonl",
                                                            "part-4.jsonl"]][index]  # fmt: skip
    assert texts[0] == [f"{k}-{i}" for k in range(2) for i in range(3)]
    assert texts[1] == [f"{k}-{i}" for k in range(2, 5) for i in range(3)]


def test_window_shuffle_keeps_reads_local(tmp_path):
    pq.write_table(pa.table({"text": TEXTS}), tmp_path / "t.parquet", row_group_size=10)
    source = Source("s", str(tmp_path / "t.parquet"), format="parquet", shuffle_window=10)
    order = [
        int(r["loc"].split()[-1])
        for r in record_dataset(source, shard_index=0, shard_count=1, seed=0, num_epochs=1)
    ]
    assert sorted(order) == list(range(len(TEXTS)))
    assert all(i // 10 == j // 10 for i, j in zip(order[:30], sorted(order[:30])))


def test_prepared_token_records(tmp_path):
    writer = array_record_module.ArrayRecordWriter(str(tmp_path / "t.arrayrecord"), "group_size:1")
    writer.write(np.array([5, 6, 7], documents.TOKEN_DTYPE).tobytes())
    writer.close()
    source = Source("tok", str(tmp_path / "t.arrayrecord"), format="arrayrecord", field="tokens")
    doc = documents.parse(RecordSource(source)[0], source, "text")
    np.testing.assert_array_equal(doc["tokens"], [5, 6, 7])


def test_parquet_rows_read_from_many_threads_at_once(tmp_path):
    """Grain reads a source from several threads; every thread must get its own rows (before the
    reader took a lock, concurrent row-group reads of one file crashed the process)."""
    import concurrent.futures

    texts = [f"row {i}" for i in range(2000)]
    pq.write_table(pa.table({"text": texts}), tmp_path / "t.parquet", row_group_size=7)
    source = RecordSource(Source("s", str(tmp_path / "t.parquet"), format="parquet"))
    order = np.random.default_rng(0).permutation(len(texts)).tolist() * 3
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        rows = list(pool.map(lambda i: source[i]["value"]["text"], order))
    assert rows == [texts[i] for i in order]
