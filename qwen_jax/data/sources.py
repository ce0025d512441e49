"""Random-access readers for JSONL (plain, gzip, zstd), Parquet and ArrayRecord files.

Every format is exposed as one Grain `RandomAccessDataSource` over the files matched by a
source's globs, so that shuffling, epochs and checkpointing are Grain's own index arithmetic and
identical for every format. A data shard reads whole files when the source has at least as many
files as there are shards (contiguous runs of files, as Hugging Face datasets' node split does),
so each host opens and indexes only its own files; with fewer files, every shard indexes all of
them and reads a contiguous slice of their records. Each element is a raw record tagged with its
source name and location (`file:line`); parsing happens later so that bad records can be
counted rather than crash a reader thread.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Sequence
from typing import Any

import grain
import numpy as np

from qwen_jax.data.config import Source

_INDEX_CHUNK = 1 << 24


def resolve_paths(source: Source) -> list[str]:
    """Expands the source's glob patterns (sorted, so every host sees the same order)."""
    paths: list[str] = []
    for pattern in source.paths:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        matches = [m for m in matches if os.path.isfile(m)]
        if not matches:
            raise FileNotFoundError(f"Source {source.name!r}: no file matches {pattern!r}")
        paths.extend(matches)
    return paths


def _cache_dir() -> str:
    return os.environ.get(
        "QWEN_JAX_DATA_CACHE", os.path.join(tempfile.gettempdir(), "qwen_jax_data_cache")
    )


def _decompressed(path: str) -> str:
    """A plain copy of a .gz/.zst file in the local cache, so lines can be read at random.

    Keyed by path, size and mtime; written to a temporary name and renamed, so concurrent workers
    or hosts sharing a disk never see a partial file.
    """
    stat = os.stat(path)
    key = hashlib.sha1(f"{os.path.abspath(path)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    target = os.path.join(_cache_dir(), key.hexdigest() + ".jsonl")
    if os.path.exists(target):
        return target
    os.makedirs(_cache_dir(), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=_cache_dir(), suffix=".part")
    with os.fdopen(fd, "wb") as out:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                shutil.copyfileobj(f, out, _INDEX_CHUNK)
        else:
            import zstandard  # only needed for .zst input

            with open(path, "rb") as raw:
                zstandard.ZstdDecompressor().copy_stream(raw, out)
    os.replace(tmp, target)
    return target


class JsonlFile:
    """Line-addressable JSONL file: one scan builds the byte offsets of every line."""

    def __init__(self, path: str):
        self.path = path
        self._plain = _decompressed(path) if path.endswith((".gz", ".zst")) else path
        newlines = []
        size = 0
        with open(self._plain, "rb") as f:
            while chunk := f.read(_INDEX_CHUNK):
                newlines.append(np.flatnonzero(np.frombuffer(chunk, np.uint8) == 10) + size)
                size += len(chunk)
        nl = np.concatenate(newlines) if newlines else np.zeros(0, np.int64)
        self._starts = np.concatenate([[0], nl + 1]).astype(np.int64)
        self._ends = np.concatenate([nl, [size]]).astype(np.int64)
        if self._starts[-1] == size:  # a final newline ends the last line; it opens no new one
            self._starts, self._ends = self._starts[:-1], self._ends[:-1]
        self._fd = None

    def __len__(self) -> int:
        return len(self._starts)

    def location(self, j: int) -> str:
        return f"{self.path}:{j + 1}"

    def read(self, j: int) -> bytes:
        if self._fd is None:
            self._fd = os.open(self._plain, os.O_RDONLY)
        start = int(self._starts[j])
        return os.pread(self._fd, int(self._ends[j]) - start, start)

    def __getstate__(self):
        # File descriptors do not survive pickling into Grain worker processes; reopen lazily.
        return {**self.__dict__, "_fd": None}


class ParquetFile:
    """Row-addressable Parquet file; decoded row groups are cached, so sequential or windowed
    access costs one row-group read per row group. Grain reads with several threads, and one
    `pyarrow.parquet.ParquetFile` must not be read by two at once (it crashed the process), so
    reads take a lock."""

    _CACHED_GROUPS = 2

    def __init__(self, path: str, columns: Sequence[str]):
        import pyarrow.parquet as pq

        self.path = path
        metadata = pq.ParquetFile(path).metadata
        names = set(metadata.schema.names)
        self._columns = [c for c in columns if c in names] or None  # missing ones: reported per row
        counts = [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]
        self._group_starts = np.cumsum([0] + counts)
        self._file = None
        self._groups: dict[int, list[dict]] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return int(self._group_starts[-1])

    def location(self, j: int) -> str:
        return f"{self.path}:row {j}"

    def read(self, j: int) -> dict:
        group = int(np.searchsorted(self._group_starts, j, side="right") - 1)
        with self._lock:
            if group not in self._groups:
                if self._file is None:
                    import pyarrow.parquet as pq

                    self._file = pq.ParquetFile(self.path)
                if len(self._groups) >= self._CACHED_GROUPS:
                    self._groups.pop(next(iter(self._groups)))
                self._groups[group] = self._file.read_row_group(
                    group, columns=self._columns
                ).to_pylist()
            rows = self._groups[group]
        return rows[j - int(self._group_starts[group])]

    def __getstate__(self):
        # Open files and locks do not pickle into Grain worker processes; each worker makes its own.
        return {**self.__dict__, "_file": None, "_groups": {}, "_lock": None}

    def __setstate__(self, state):
        self.__dict__.update(state, _lock=threading.Lock())


class ArrayRecordFile:
    def __init__(self, path: str):
        self.path = path
        self._source = grain.sources.ArrayRecordDataSource([path])

    def __len__(self) -> int:
        return len(self._source)

    def location(self, j: int) -> str:
        return f"{self.path}:record {j}"

    def read(self, j: int) -> bytes:
        return self._source[j]


class RecordSource(grain.sources.RandomAccessDataSource):
    """All records of one source, file after file: element i is
    `{"source": name, "loc": "file:line", "value": raw record}`."""

    def __init__(
        self, source: Source, columns: Sequence[str] = (), paths: Sequence[str] | None = None
    ):
        self.source = source
        self.name = source.name
        paths = resolve_paths(source) if paths is None else paths
        if source.format == "jsonl":
            self._files = [JsonlFile(p) for p in paths]
        elif source.format == "parquet":
            self._files = [ParquetFile(p, columns) for p in paths]
        elif source.format == "arrayrecord":
            self._files = [ArrayRecordFile(p) for p in paths]
        else:
            raise ValueError(f"Source {source.name!r}: format {source.format!r} is not file-based")
        self._file_starts = np.cumsum([0] + [len(f) for f in self._files])

    def __len__(self) -> int:
        return int(self._file_starts[-1])

    def __getitem__(self, index: int) -> dict[str, Any]:
        f = int(np.searchsorted(self._file_starts, index, side="right") - 1)
        j = index - int(self._file_starts[f])
        file = self._files[f]
        return {"source": self.name, "loc": file.location(j), "value": file.read(j)}

    def first_records(self) -> list[tuple[str, Any]]:
        """(location, raw record) of each file's first record, for checking the format up front."""
        return [(f.location(0), f.read(0)) for f in self._files if len(f)]

    def __repr__(self) -> str:
        return f"RecordSource({self.name!r}, {len(self._files)} files, {len(self)} records)"


class WindowShuffle(grain.MapDataset):
    """Shuffles within consecutive windows of `window` records, differently in every epoch.

    (Grain's `WindowShuffleMapDataset` maps a short final window onto wrong indices in the
    installed version, so the permutation is Grain's O(1) `index_shuffle` applied per window.)
    """

    def __init__(self, parent: grain.MapDataset, window: int, seed: int):
        super().__init__(parent)
        self._window = window
        self._seed = seed

    def __len__(self) -> int:
        return len(self._parent)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        epoch, i = divmod(index, len(self))
        start = i - i % self._window
        size = min(self._window, len(self) - start)
        seed = (self._seed + epoch * 1_000_003 + start) & 0x7FFFFFFF
        return self._parent[
            epoch * len(self)
            + start
            + grain.experimental.index_shuffle(i - start, max_index=size - 1, seed=seed, rounds=4)
        ]

    def __str__(self) -> str:
        return f"WindowShuffle(window={self._window})"


def format_of(path: str) -> str:
    """The file format a path's suffix names (JSONL otherwise)."""
    if path.endswith(".parquet"):
        return "parquet"
    if path.endswith((".arrayrecord", ".array_record")):
        return "arrayrecord"
    return "jsonl"


def host_slice(length: int, shard_index: int, shard_count: int) -> slice:
    """The contiguous range of records host `shard_index` reads (contiguous keeps reads local)."""
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} is not in [0, {shard_count})")
    return slice(length * shard_index // shard_count, length * (shard_index + 1) // shard_count)


def record_dataset(
    source: Source,
    *,
    shard_index: int,
    shard_count: int,
    seed: int,
    num_epochs: int | None,
    shuffle: bool = True,
    columns: Sequence[str] = (),
    check: Callable[[list[tuple[str, Any]]], None] | None = None,
) -> grain.MapDataset:
    """The shard's records of `source`, shuffled per epoch, repeated `num_epochs` times (None:
    forever). `check` sees the first record of each file the shard reads, before any is read."""
    paths = resolve_paths(source)
    whole_files = len(paths) >= shard_count
    if whole_files:
        paths = paths[host_slice(len(paths), shard_index, shard_count)]
    records = RecordSource(source, columns, paths)
    if check is not None:
        check(records.first_records())
    ds = grain.MapDataset.source(records)
    if not whole_files:
        ds = ds[host_slice(len(ds), shard_index, shard_count)]
    if len(ds) == 0:
        raise ValueError(
            f"Source {source.name!r} has no records for shard {shard_index} of {shard_count}"
        )
    if shuffle and source.shuffle_window:
        ds = WindowShuffle(ds, source.shuffle_window, seed)
    elif shuffle:
        ds = ds.shuffle(seed)  # reshuffled every epoch when followed by repeat
    return ds.repeat(num_epochs)
