"""Packing examples into fixed-length rows, and batching rows.

Both packers are Grain's own (`FirstFitPackIterDataset`, `ConcatThenSplitIterDataset`); this
module only fixes their inputs and renames their outputs to the batch layout the trainer reads:
`inputs`, `targets` (int32), `loss_mask` (float32), `segment_ids` (1, 2, ... per example in the
row, 0 for padding) and `positions` (restarting at 0 for each example). Padding tokens are the
tokenizer's pad id, and padding has segment id 0, position 0 and loss mask 0.
"""

from __future__ import annotations

import functools

import grain
import numpy as np

from qwen_jax.data.examples import LM_FEATURES

PACKINGS = ("first_fit", "concat_split")
BATCH_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")


def _finalize_row(row: dict, pad_id: int) -> dict[str, np.ndarray]:
    # Grain emits segment ids and positions for each packed feature; they agree, keep one set.
    segment_ids = row["inputs_segment_ids"].astype(np.int32)
    padding = segment_ids == 0
    return {
        "inputs": np.where(padding, pad_id, row["inputs"]).astype(np.int32),
        "targets": np.where(padding, pad_id, row["targets"]).astype(np.int32),
        "loss_mask": row["loss_mask"].astype(np.float32),
        "segment_ids": segment_ids,
        "positions": row["inputs_positions"].astype(np.int32),
    }


def pack(
    ds: grain.IterDataset,
    *,
    seq_len: int,
    packing: str,
    num_packing_bins: int,
    seed: int,
    pad_id: int,
) -> grain.IterDataset:
    """Packs examples (dicts of `LM_FEATURES`) into rows of `seq_len`.

    first_fit: examples must already be at most `seq_len` long (see `examples.split_example`);
    rows are filled first-fit over `num_packing_bins` open rows, and the bins are shuffled.
    concat_split: examples are concatenated and cut every `seq_len` tokens, so no padding except
    at the end of a finite stream; a cut example continues in the next row at position 0.
    """
    lengths = {k: seq_len for k in LM_FEATURES}
    if packing == "first_fit":
        ds = grain.experimental.FirstFitPackIterDataset(
            ds,
            length_struct=lengths,
            num_packing_bins=num_packing_bins,
            seed=seed,
            shuffle_bins=True,
        )
    elif packing == "concat_split":
        ds = grain.experimental.ConcatThenSplitIterDataset(ds, length_struct=lengths)
    else:
        raise ValueError(f"packing must be one of {PACKINGS}, got {packing!r}")
    return ds.map(functools.partial(_finalize_row, pad_id=pad_id))


def pad_batch(batch: dict[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
    """Pads a short final batch with all-padding rows, so a finite pass keeps one static shape."""
    n = next(iter(batch.values())).shape[0]
    if n == batch_size:
        return batch
    return {
        k: np.concatenate([v, np.zeros((batch_size - n,) + v.shape[1:], v.dtype)])
        for k, v in batch.items()
    }
