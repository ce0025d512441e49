"""The training batches of a run split into a fixed number of data shards, each process reading
the shards it owns.

A run's data is `count` shards (`setup.RunConfig.data_shards`, by default one per process):
shard s reads the s-th part of every source and yields batch_size / count rows per step; a
step's global batch is the shards' rows in shard order, whichever process holds them. So the
batches do not depend on how many processes read them, and a checkpoint keeps one iterator state
per shard: a restart onto any process count that divides `count` re-shards deterministically
(each process takes its shards' states); a restart with another shard count is refused with one
line naming the setting that restores it.

Saving gathers every shard's state to every process (one small JSON per shard), so the
checkpoint's data item, written by the primary process, holds them all.

Data that ends (epochs) ends for the run when it ends for any shard: shards hold different
documents, so one may run out a step before another, and a process that stopped stepping would
leave the others blocked in the step's collectives. With `agree_on_end` every step's batch is
confirmed by a one-flag all-gather across processes; the shards' rows of the step in which one
ran out are dropped.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import grain
import jax
import numpy as np


class ShardError(ValueError):
    pass


def owned(count: int, process_index: int, process_count: int) -> list[int]:
    if count % process_count:
        raise ShardError(
            f"{count} data shards cannot be split over {process_count} processes: run with a "
            f"process count that divides {count}, or start a new run"
        )
    per_process = count // process_count
    return list(range(process_index * per_process, (process_index + 1) * per_process))


class ShardedIterator(grain.DatasetIterator):
    """This process's shards' iterators (`build(shard_index, shard_count)`) as one iterator of
    its rows of the global batch."""

    def __init__(self, build: Callable[[int, int], Any], count: int, *, agree_on_end: bool):
        super().__init__()
        self.count = count
        self.agree_on_end = agree_on_end and jax.process_count() > 1
        self.shards = owned(count, jax.process_index(), jax.process_count())
        self.iterators = [build(shard, count) for shard in self.shards]
        self._trackers = [it.bad_records for it in self.iterators if it.bad_records is not None]

    @property
    def first(self):
        """One shard's iterator: every shard is at the same step of the same stage."""
        return self.iterators[0]

    def __next__(self) -> dict[str, np.ndarray]:
        batches = []
        for iterator in self.iterators:
            try:
                batches.append(next(iterator))
            except StopIteration:
                break
        ended = len(batches) < len(self.iterators)
        if self.agree_on_end:
            from jax.experimental import multihost_utils

            ended = bool(multihost_utils.process_allgather(np.array([ended])).any())
        if ended:
            raise StopIteration
        if len(batches) == 1:
            return batches[0]
        return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}

    def get_state(self) -> dict[str, Any]:
        """Every shard's state; a collective when there are several processes."""
        local = {str(s): it.get_state() for s, it in zip(self.shards, self.iterators)}
        return {"data_shards": self.count, "shards": _gather(local)}

    def bad_record_totals(self) -> dict[str, float]:
        """The bad-record tallies of all shards, summed; a collective with several processes."""
        local = [tracker.scalars() for tracker in self._trackers]
        everyone = _gather({f"{jax.process_index()}/{i}": t for i, t in enumerate(local)})
        total: dict[str, float] = {}
        for scalars in everyone.values():
            for name, value in scalars.items():
                total[name] = total.get(name, 0.0) + value
        return total

    def set_state(self, state: dict[str, Any]) -> None:
        saved = state.get("data_shards")
        if saved != self.count:
            raise ShardError(
                f"the checkpoint's data position is split over {saved} data shards and this run "
                f"has {self.count}: set setup.RunConfig.data_shards = {saved} (any process count "
                f"that divides it restores exactly)"
            )
        for shard, iterator in zip(self.shards, self.iterators):
            iterator.set_state(state["shards"][str(shard)])

    def start_prefetch(self) -> None:
        for iterator in self.iterators:
            iterator.start_prefetch()

    def close(self) -> None:
        for iterator in getattr(self, "iterators", ()):
            iterator.close()
        super().close()


def _gather(local: dict[str, Any]) -> dict[str, Any]:
    """The union of every process's `local` dict (JSON-serializable)."""
    if jax.process_count() == 1:
        return local
    from jax.experimental import multihost_utils

    encoded = np.frombuffer(json.dumps(local).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.array([encoded.size]))
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: encoded.size] = encoded
    everyone = multihost_utils.process_allgather(padded)
    merged: dict[str, Any] = {}
    for row, size in zip(everyone, sizes.reshape(-1)):
        merged.update(json.loads(bytes(row[: int(size)]).decode()))
    return merged
