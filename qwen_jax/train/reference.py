"""DPO reference log-probs computed in one pass before training (TRL's `precompute_ref_log_probs`).

With the table, training keeps no frozen reference model on the devices: every pair carries its
reference log-probs, looked up by the record's location (`file:line`). The table is written once
into the workdir, beside the checkpoints and the data state they hold, so a resumed run reads it
back instead of recomputing it with a model that may have changed.
"""

from __future__ import annotations

import itertools
import os
import zipfile
from collections.abc import Callable, Iterable, Mapping

import numpy as np
from flax import nnx

from qwen_jax.data import packing
from qwen_jax.parallel import host_data
from qwen_jax.train import dpo

TABLE_FILE = "reference_logps.npz"
Table = Mapping[str, tuple[float, float]]


def compute_table(
    model,
    pairs: Iterable[dict],
    to_example: Callable[[dict], dict],
    *,
    placement: host_data.Placement,
    batch_size: int,
    chunk_size: int,
) -> dict[str, tuple[float, float]]:
    """{loc: (chosen, rejected) summed response log-probs under `model`} for every parsed pair
    of `pairs`, which every process reads whole; `to_example` turns a pair into the row the training
    pipeline builds for it. Each process builds only its devices' rows of each batch, and every
    process gets the whole table."""

    @nnx.jit
    def logps(model, batch):
        summed, _ = dpo.sequence_logprobs(model, batch, chunk_size=chunk_size)
        return summed

    table = {}
    pairs = iter(pairs)
    while chunk := list(itertools.islice(pairs, batch_size)):

        def rows(first, stop, chunk=chunk):
            built = [to_example(doc) for doc in chunk[first:stop]] or [to_example(chunk[0])]
            stacked = {k: np.stack([r[k] for r in built]) for k in built[0]}
            if first >= len(chunk):  # rows past the end are padding
                stacked = {k: np.zeros_like(v) for k, v in stacked.items()}
            return packing.pad_batch(stacked, stop - first)

        batch = placement.from_everyone(batch_size, rows)
        out = {side: host_data.to_host(v) for side, v in logps(model, batch).items()}
        for i, doc in enumerate(chunk):
            table[doc["loc"]] = (float(out["chosen"][i]), float(out["rejected"][i]))
    return table


def save_table(path: str, table: Table) -> None:
    """Writes the table atomically (a partial file is never read as a table)."""
    locs = sorted(table)
    staging = f"{path}.partial.npz"
    np.savez(
        staging,
        locs=np.asarray(locs, dtype=str),
        chosen=np.asarray([table[k][0] for k in locs], np.float32),
        rejected=np.asarray([table[k][1] for k in locs], np.float32),
    )
    os.replace(staging, path)


def load_table(path: str) -> dict[str, tuple[float, float]]:
    try:
        with np.load(path) as data:
            return {
                str(loc): (float(c), float(r))
                for loc, c, r in zip(data["locs"], data["chosen"], data["rejected"])
            }
    except (ValueError, KeyError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(
            f"{path}: not a readable reference table ({e}); delete it to compute it again"
        ) from None
