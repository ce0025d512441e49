"""Host rows in and out of global arrays, for programs that every process of a run executes.

In a multi-controller JAX run a jitted program takes global arrays, and each process supplies
only the rows its own devices hold. Rows enter in one of two ways:
- `Placement.from_local`: each process holds its own share of the rows (the training shards,
  the evaluation split each process reads); the global batch is the processes' shares.
- `Placement.from_everyone`: every process can build any row (held-out sets small enough to read
  whole on every host); each builds only the rows its devices hold, so the work is split across
  processes while the result is the same as one process's.
`to_host` reads a global result back whole on every process, `local_rows` the rows this process
supplied.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from qwen_jax.parallel import mesh as mesh_lib
from qwen_jax.parallel.logical import LogicalRules

Rows = dict[str, np.ndarray]


def global_shapes(rows: Rows) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch's shapes when every process holds an equal share of its rows."""
    return {
        k: jax.ShapeDtypeStruct(
            (len(v) * jax.process_count(), *np.shape(v)[1:]), np.asarray(v).dtype
        )
        for k, v in rows.items()
    }


def to_host(x: jax.Array) -> np.ndarray:
    """The whole of a global array, on every process; a collective every process must join
    when the array spans several."""
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def local_rows(x: jax.Array) -> np.ndarray:
    """The rows of a global batch array that this process supplied (`Placement.from_local`)."""
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    sharding = x.sharding
    return np.asarray(
        multihost_utils.global_array_to_host_local_array(x, sharding.mesh, sharding.spec)
    )


def same_count(batches: Iterable[Rows]) -> Iterator[Rows]:
    """This process's batches, padded with all-zero ones to the most any process has: every
    process must run a global program equally often (a zero row is padding for every task)."""
    if jax.process_count() == 1:
        yield from batches
        return
    local = list(batches)
    counts = multihost_utils.process_allgather(np.array([len(local)]))
    if counts.min() == 0:
        raise ValueError(
            f"the eval split gives {counts.reshape(-1).tolist()} batches to the processes; each "
            f"needs one: use a larger eval source or a smaller eval batch size"
        )
    empty = {k: np.zeros_like(v) for k, v in local[-1].items()}
    yield from local + [empty] * (int(counts.max()) - len(local))


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where a run's batches live: its mesh and the rules that place `activation_batch` (and
    `activation_length`, for [batch, length] arrays that are not cut to a multiple of it)."""

    mesh: Mesh
    rules: LogicalRules

    @property
    def batch_shards(self) -> int:
        """How many parts a batch is split into; global batch sizes are multiples of it."""
        return math.prod(self.mesh.shape[a] for a in mesh_lib.BATCH_AXES)

    def shardings(self, shapes: dict, *, split_length: bool = True) -> dict:
        if split_length:
            return mesh_lib.batch_shardings(self.mesh, self.rules, shapes)
        return {
            k: mesh_lib.batch_sharding(self.mesh, self.rules, v.shape[0]) for k, v in shapes.items()
        }

    def from_local(self, rows: Rows, *, split_length: bool = True) -> dict[str, jax.Array]:
        shardings = self.shardings(global_shapes(rows), split_length=split_length)
        return {
            k: jax.make_array_from_process_local_data(shardings[k], np.asarray(v))
            for k, v in rows.items()
        }

    def from_everyone(
        self, size: int, rows: Callable[[int, int], Rows], *, split_length: bool = True
    ) -> dict[str, jax.Array]:
        """A global batch of `size` rows; `rows(start, stop)` builds rows [start, stop), and is
        called only for the rows this process's devices hold (and once for row 0's shapes)."""
        probe = rows(0, 1)
        shapes = {
            k: jax.ShapeDtypeStruct((size, *np.shape(v)[1:]), v.dtype) for k, v in probe.items()
        }
        built: dict[tuple[int, int], Rows] = {}

        def block(key, index):
            span = (index[0].start or 0, size if index[0].stop is None else index[0].stop)
            if span not in built:  # devices that hold the same rows share one build
                built[span] = rows(*span)
            return built[span][key][(slice(None), *index[1:])]

        shardings = self.shardings(shapes, split_length=split_length)
        return {
            k: jax.make_array_from_callback(
                shapes[k].shape, shardings[k], lambda index, k=k: block(k, index)
            )
            for k in shapes
        }

    def to_local(self, x: jax.Array) -> np.ndarray:
        """The rows of `x`, a result of a program fed by `from_local`, that this process fed.
        A program may hand back its result replicated (the decoder's loop does); it is first
        laid out over the batch axes like its input rows, so each process reads its own."""
        return local_rows(
            jax.device_put(x, mesh_lib.batch_sharding(self.mesh, self.rules, x.shape[0]))
        )

    def padded_size(self, count: int) -> int:
        """The smallest global batch size that holds `count` rows."""
        return -(-count // self.batch_shards) * self.batch_shards


def shared_rows(placement: Placement | None, full: Rows) -> Rows:
    """`full` (rows every process holds) as a program's input: as they are in one process
    (`placement` None), else a global batch of which each process feeds its devices' rows, padded
    to a size the batch axes divide with copies of the last row (whose results are dropped)."""
    if placement is None:
        return full
    count = len(next(iter(full.values())))
    take = np.minimum(np.arange(placement.padded_size(count)), count - 1)
    padded = {k: np.asarray(v)[take] for k, v in full.items()}
    return placement.from_everyone(
        len(take), lambda start, stop: {k: v[start:stop] for k, v in padded.items()},
        split_length=False,
    )  # fmt: skip
