"""Data shards: rows in shard order, one state per shard, and restores onto other shard or
process counts refused with the setting that works."""

from __future__ import annotations

import numpy as np
import pytest

from qwen_jax.data import shards


class _Counter:
    """A resumable iterator of [1, 2] batches tagged with its shard, `length` of them."""

    bad_records = None

    def __init__(self, shard: int, length: int = 100):
        self.shard, self.position, self.length = shard, 0, length

    def __next__(self):
        if self.position == self.length:
            raise StopIteration
        self.position += 1
        return {"inputs": np.array([[self.shard, self.position]])}

    def get_state(self):
        return {"position": self.position}

    def set_state(self, state):
        self.position = state["position"]

    def close(self):
        pass


def test_rows_come_in_shard_order_and_every_shard_resumes():
    iterator = shards.ShardedIterator(lambda shard, count: _Counter(shard), 3, agree_on_end=False)
    assert iterator.shards == [0, 1, 2]
    np.testing.assert_array_equal(next(iterator)["inputs"], [[0, 1], [1, 1], [2, 1]])
    state = iterator.get_state()
    assert state == {"data_shards": 3, "shards": {str(s): {"position": 1} for s in range(3)}}
    next(iterator)
    resumed = shards.ShardedIterator(lambda shard, count: _Counter(shard), 3, agree_on_end=False)
    resumed.set_state(state)
    np.testing.assert_array_equal(next(resumed)["inputs"], [[0, 2], [1, 2], [2, 2]])


def test_other_counts_are_refused_naming_what_works():
    iterator = shards.ShardedIterator(lambda shard, count: _Counter(shard), 2, agree_on_end=False)
    with pytest.raises(shards.ShardError, match="set setup.RunConfig.data_shards = 4"):
        iterator.set_state({"data_shards": 4, "shards": {}})
    assert shards.owned(4, 1, 2) == [2, 3]
    with pytest.raises(shards.ShardError, match="cannot be split over 3 processes"):
        shards.owned(4, 0, 3)


def test_data_ends_for_the_run_when_it_ends_for_any_shard():
    iterator = shards.ShardedIterator(
        lambda shard, count: _Counter(shard, length=2 if shard == 1 else 3), 2, agree_on_end=True
    )
    assert len(list(iterator)) == 2  # shard 0's third batch is dropped with the step
