"""Deduplication against brute force: a 10,000-document corpus with planted exact copies and
near duplicates, every pair's Jaccard similarity computed exactly, and the MinHash-LSH result
judged by recall and precision over those pairs."""

import json
import random
import unicodedata

import numpy as np
import pytest
import scipy.sparse

from qwen_jax.data.quality import dedup
from qwen_jax.data.quality import run as quality_run

THRESHOLD = 0.8
DOCUMENTS = 10_000


def _corpus(seed: int = 0):
    """Texts, and for each planted document the index of the original it copies: exact copies
    (case, whitespace and Unicode normal form changed), near copies (a few words replaced,
    inserted or dropped: Jaccard spread over 0.4-1.0 so that the threshold is crossed both
    ways)."""
    rng = random.Random(seed)
    vocab = [
        "".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9)))
        for _ in range(20_000)
    ]
    vocab[:3] = ["café", "naïve", "über"]  # letters with a decomposed Unicode form
    texts, exact, near, base = [], {}, {}, []
    while len(texts) < DOCUMENTS:
        kind = rng.random()
        if kind < 0.06 and base:
            original = rng.choice(base)
            copy = texts[original].upper() if rng.random() < 0.5 else texts[original]
            copy = "  ".join(copy.split(" ")).replace(" ", "\n", 1)
            exact[len(texts)] = original
            texts.append(unicodedata.normalize("NFD", copy))
        elif kind < 0.16 and base:
            original = rng.choice(base)
            words = texts[original].split()
            for _ in range(rng.randint(1, max(1, len(words) // 12))):
                i = rng.randrange(len(words))
                op = rng.random()
                if op < 0.5:
                    words[i] = rng.choice(vocab)
                elif op < 0.75:
                    words.insert(i, rng.choice(vocab))
                elif len(words) > 10:
                    del words[i]
            near[len(texts)] = original
            texts.append(" ".join(words))
        else:
            words = rng.choices(vocab[3:] if rng.random() < 0.9 else vocab, k=rng.randint(30, 150))
            base.append(len(texts))
            texts.append(" ".join(words))
    return texts, exact, near


def _pairs_at_or_above(texts, threshold):
    """Every pair (i < j) whose word 5-gram sets have Jaccard >= threshold, exactly: shingle
    incidence matrix times its transpose gives every pair's intersection."""
    ids: dict[bytes, int] = {}
    rows, cols = [], []
    for i, text in enumerate(texts):
        for shingle in dedup.shingles(text, 5):
            rows.append(i)
            cols.append(ids.setdefault(shingle, len(ids)))
    m = scipy.sparse.csr_matrix(
        (np.ones(len(rows), np.int32), (rows, cols)), shape=(len(texts), len(ids))
    )
    sizes = np.asarray(m.sum(1)).ravel()
    inter = scipy.sparse.triu(m @ m.T, k=1).tocoo()
    jaccard = inter.data / (sizes[inter.row] + sizes[inter.col] - inter.data)
    keep = jaccard >= threshold
    return (
        {
            (int(i), int(j)): float(x)
            for i, j, x in zip(inter.row[keep], inter.col[keep], jaccard[keep])
        },
        m,
        sizes,
    )


def _jaccard(m, sizes, i, j):
    inter = m[i].multiply(m[j]).sum()
    return inter / (sizes[i] + sizes[j] - inter)


@pytest.fixture(scope="module")
def deduplicated(tmp_path_factory):
    texts, exact, near = _corpus()
    directory = tmp_path_factory.mktemp("dedup")
    path = directory / "corpus.jsonl"
    with open(path, "w") as f:
        for i, text in enumerate(texts):
            f.write(json.dumps({"text": text, "id": i}) + "\n")
    config = quality_run.QualityConfig(
        input=str(path),
        output=str(directory / "out"),
        stages=[dedup.ExactDedup(), dedup.NearDedup(threshold=THRESHOLD)],
        chunk_size=2_500,  # clusters span chunks
    )
    summary = quality_run.run_pipeline(config)
    records = {}
    for name in ("part-*.jsonl", "removed/part-*.jsonl"):
        for shard in sorted((directory / "out").glob(name)):
            for line in shard.read_text().splitlines():
                record = json.loads(line)
                records[record["id"]] = record
    return texts, exact, near, records, summary


def _index(loc: str) -> int:
    return int(loc.rsplit(":", 1)[1]) - 1  # line numbers are 1-based


def test_exact_dedup_removes_every_planted_copy(deduplicated):
    texts, exact, _, records, summary = deduplicated
    assert len(records) == len(texts) == summary["documents"]
    for copy, original in exact.items():
        record = records[copy]
        assert record["removed_by"] == "exact_dedup/duplicate", copy
        first = _index(record["dup_cluster"])
        assert dedup.normalize(texts[first]) == dedup.normalize(texts[original])
        assert first <= original  # the first occurrence is the one kept
    # No document is an exact duplicate unless its normalised text came earlier.
    seen = set()
    for i, text in enumerate(texts):
        key = dedup.normalize(text)
        removed = records[i].get("removed_by") == "exact_dedup/duplicate"
        assert removed == (key in seen), i
        seen.add(key)


def test_near_dedup_recall_and_precision_against_all_pairs(deduplicated):
    texts, _, near, records, summary = deduplicated

    def representative(i):
        """The kept document i's cluster ends at (exact copies point at their first
        occurrence, which near dedup may itself have assigned)."""
        while records[i].get("removed_by"):
            i = _index(records[i]["dup_cluster"])
        return i

    pairs, m, sizes = _pairs_at_or_above(texts, THRESHOLD)
    assert len(pairs) > 500  # the planted near copies and the exact copies
    found = sum(representative(i) == representative(j) for i, j in pairs)
    recall = found / len(pairs)
    removed = [i for i, r in records.items() if r.get("removed_by") == "near_dedup/near_duplicate"]
    correct = sum(
        _jaccard(m, sizes, i, _index(records[i]["dup_cluster"])) >= THRESHOLD for i in removed
    )
    precision = correct / len(removed)
    print(f"near duplicates: {len(pairs)} pairs, recall {recall:.4f}, precision {precision:.4f}")
    assert recall >= 0.95
    assert precision >= 0.95
    # Planted copies below the threshold exist, so precision was at stake.
    below = [c for c, o in near.items() if _jaccard(m, sizes, c, o) < THRESHOLD - 0.1]
    assert len(below) > 50
    assert summary["rules"]["near_dedup/near_duplicate"] == len(removed)


def test_dedup_state_rebuilt_from_chunks_equals_continuous():
    """Restoring from each chunk's saved part gives the memory an uninterrupted run has."""
    texts, _, _ = _corpus(seed=1)
    texts = texts[:600]

    def docs(lo, hi):
        from qwen_jax.data.quality.stage import Document

        return [Document({"text": t}, t, f"f:{i + 1}") for i, t in enumerate(texts[lo:hi], lo)]

    for make in (dedup.ExactDedup, dedup.NearDedup):
        continuous, parts = make(), []
        first = docs(0, 300)
        continuous.process(first)
        parts.append(continuous.chunk_state())
        resumed = make()
        resumed.restore(parts)
        a, b = docs(300, 600), docs(300, 600)
        continuous.process(a)
        resumed.process(b)
        assert [d.removed for d in a] == [d.removed for d in b]
        assert [d.record for d in a] == [d.record for d in b]
        assert any(d.removed for d in a)
