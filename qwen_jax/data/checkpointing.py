"""Saving the data iterator's position beside the model checkpoint.

The state is Grain's: `iterator.get_state()` is a JSON-serializable dict (for pre-training it
holds the stage index, the step and the stage pipeline's state). Grain ships an Orbax handler,
`grain.checkpoint.CheckpointHandler`, that writes one `process_{i}-of-{n}.json` per host; the
trainer registers it as one more item of its Orbax `CheckpointManager`:

    manager = ocp.CheckpointManager(dir, item_names=("state", "data"), ...)
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(train_state),
        data=grain.checkpoint.CheckpointSave(data_iterator)))
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=grain.checkpoint.CheckpointRestore(data_iterator)))  # sets its state in place

The two helpers below do the same without a manager (tools, tests, custom loops).
"""

from __future__ import annotations

import os

import grain
from etils import epath


def save_iterator_state(directory: str | os.PathLike, iterator: grain.DatasetIterator) -> None:
    """Writes this host's iterator state into `directory` (created if needed)."""
    path = epath.Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    grain.checkpoint.CheckpointHandler().save(path, args=grain.checkpoint.CheckpointSave(iterator))


def restore_iterator_state(
    directory: str | os.PathLike, iterator: grain.DatasetIterator
) -> grain.DatasetIterator:
    """Restores this host's state into a freshly built `iterator` (same config) and returns it."""
    return grain.checkpoint.CheckpointHandler().restore(
        epath.Path(directory), args=grain.checkpoint.CheckpointRestore(iterator)
    )
