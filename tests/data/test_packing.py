"""Packing loses and duplicates nothing, and marks every boundary right (both packers)."""

import collections

import grain
import numpy as np
import pytest

from qwen_jax.data import examples, packing

EOS, PAD = 1, 0


def rows(docs, seq_len, method, bins=4):
    split = seq_len if method == "first_fit" else None
    ds = grain.MapDataset.source(docs).to_iter_dataset().batch(7, batch_fn=list)

    class ToExamples(grain.experimental.FlatMapTransform):
        max_fan_out = 1 << 20

        def flat_map(self, batch):
            out = []
            for doc in batch:
                ex = examples.lm_example(doc, EOS)
                out.extend(examples.split_example(ex, split) if split else [ex])
            return out

    ds = grain.experimental.FlatMapIterDataset(ds, ToExamples())
    ds = packing.pack(
        ds, seq_len=seq_len, packing=method, num_packing_bins=bins, seed=3, pad_id=PAD
    )
    return list(ds)


def make_docs(n=60, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 70, size=n)
    lengths[5] = 200  # much longer than a row: must be split
    start = 2
    docs = []
    for length in lengths:  # unique token values, so a duplicate or loss shows in the multiset
        docs.append(np.arange(start, start + length, dtype=np.int32))
        start += length
    return docs


def check_row(row, seq_len):
    for key in packing.BATCH_KEYS:
        assert row[key].shape == (seq_len,), key
    seg, pos = row["segment_ids"], row["positions"]
    assert row["inputs"].dtype == np.int32 and row["loss_mask"].dtype == np.float32
    real = seg > 0
    # Segments are 1, 2, ... in order, then padding only at the end.
    n_real = int(real.sum())
    assert real[:n_real].all() and not real[n_real:].any()
    assert seg[0] == 1
    assert set(np.diff(seg[:n_real]).tolist()) <= {0, 1}
    # Positions restart at 0 at each new segment and count up inside it.
    for i in range(n_real):
        if i == 0 or seg[i] != seg[i - 1]:
            assert pos[i] == 0
        else:
            assert pos[i] == pos[i - 1] + 1
            # Inside a segment the targets are the inputs shifted by one.
            assert row["targets"][i - 1] == row["inputs"][i]
    np.testing.assert_array_equal(row["loss_mask"], real.astype(np.float32))
    assert (row["inputs"][~real] == PAD).all() and (row["targets"][~real] == PAD).all()
    assert (pos[~real] == 0).all()


@pytest.mark.parametrize("method", packing.PACKINGS)
def test_packing_loses_and_duplicates_nothing(method):
    docs = make_docs()
    seq_len = 48
    out = rows(docs, seq_len, method)
    for row in out:
        check_row(row, seq_len)
    expected_targets = collections.Counter(np.concatenate(docs).tolist())
    expected_targets[EOS] += len(docs)
    got_targets = collections.Counter(
        np.concatenate([r["targets"][r["loss_mask"] > 0] for r in out]).tolist()
    )
    assert got_targets == expected_targets
    expected_inputs = collections.Counter(np.concatenate(docs).tolist())
    expected_inputs[EOS] += len(docs)
    got_inputs = collections.Counter(
        np.concatenate([r["inputs"][r["segment_ids"] > 0] for r in out]).tolist()
    )
    assert got_inputs == expected_inputs
    # Each document starts a segment with the separator (unless it continues a split document),
    # and documents are separated by <|endoftext|> in both inputs and targets.
    starts = [
        r["inputs"][i]
        for r in out
        for i in range(seq_len)
        if r["segment_ids"][i] > 0 and r["positions"][i] == 0
    ]
    assert starts.count(EOS) == len(docs)


def test_concat_split_keeps_the_stream_in_order():
    docs = make_docs(30, seed=1)
    out = rows(docs, 32, "concat_split")
    stream = np.concatenate([np.concatenate([[EOS], d]) for d in docs])
    got = np.concatenate([r["inputs"][r["segment_ids"] > 0] for r in out])
    np.testing.assert_array_equal(got, stream)
    # Only the final row may have padding.
    assert all((r["segment_ids"] > 0).all() for r in out[:-1])


def test_first_fit_rows_hold_several_documents():
    out = rows(make_docs(), 64, "first_fit")
    assert max(r["segment_ids"].max() for r in out) >= 3
