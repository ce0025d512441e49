"""A registered seqio Task or Mixture as a source of a mixture (optional: needs `[seqio]`).

seqio yields a `tf.data` stream, so this source is a Grain `IterDataset` rather than a random
access one: the host shard is seqio's own `ShardInfo`, Grain worker slices take every n-th
element, and the checkpoint state is the number of elements consumed (restored by skipping).
Records carry the example dict as their value; `Source.field` names the feature to read (text
as bytes or token ids as an int array).
"""

from __future__ import annotations

from typing import Any

import grain

from qwen_jax.data.config import Source


class _SeqioIterator(grain.DatasetIterator):
    def __init__(self, dataset: "SeqioDataset", consumed: int = 0):
        super().__init__()
        self._dataset = dataset
        self._consumed = consumed
        self._numpy = None

    def _stream(self):
        if self._numpy is None:
            self._numpy = self._dataset.tf_dataset().skip(self._consumed).as_numpy_iterator()
        return self._numpy

    def __next__(self) -> dict[str, Any]:
        example = next(self._stream())
        index = self._consumed
        self._consumed += 1
        return {
            "source": self._dataset.source.name,
            "loc": f"seqio:{self._dataset.source.paths[0]}[{index}]",
            "value": example,
        }

    def get_state(self) -> dict[str, Any]:
        return {"consumed": self._consumed}

    def set_state(self, state: dict[str, Any]) -> None:
        self._consumed = state["consumed"]
        self._numpy = None


class SeqioDataset(grain.IterDataset):
    """Elements of a seqio Task/Mixture named by `source.paths[0]`, for one host."""

    def __init__(
        self,
        source: Source,
        *,
        shard_index: int,
        shard_count: int,
        seed: int,
        num_epochs: int | None,
        shuffle: bool,
    ):
        super().__init__()
        import seqio  # pylint: disable=import-outside-toplevel

        if len(source.paths) != 1:
            raise ValueError(
                f"Source {source.name!r}: a seqio source names exactly one Task/Mixture"
            )
        seqio.get_mixture_or_task(source.paths[0])  # fails early, naming the missing task
        self.source = source
        self._shard = (shard_index, shard_count)
        self._seed = seed
        self._num_epochs = num_epochs
        self._shuffle = shuffle
        self._worker_slice = slice(0, None, 1)

    def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
        del sequential_slice  # a stream can only be sliced by stride
        self._worker_slice = sl

    def tf_dataset(self):
        import seqio  # pylint: disable=import-outside-toplevel

        task = seqio.get_mixture_or_task(self.source.paths[0])
        ds = task.get_dataset(
            sequence_length=None,
            split=self.source.seqio_split,
            shuffle=self._shuffle,
            seed=self._seed,
            num_epochs=self._num_epochs,
            shard_info=seqio.ShardInfo(*self._shard),
        )
        start, step = self._worker_slice.start or 0, self._worker_slice.step or 1
        return ds.shard(step, start) if step > 1 else ds

    def __iter__(self) -> grain.DatasetIterator:
        return _SeqioIterator(self)
