"""Descriptions of data sources and training stages (gin builds them: `qwen_jax.configurables`).

These are plain frozen dataclasses so that a config can be built in Python (tests, notebooks) or
in gin (`web/Source.paths = [...]`, `stage1/DataStage.mixture = {...}`), and passed around,
hashed and pickled into Grain worker processes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence


FORMATS = ("jsonl", "parquet", "arrayrecord", "seqio")


@dataclasses.dataclass(frozen=True)
class Source:
    """One named input source.

    Attributes:
      name: the name mixtures refer to; also used in bad-record reports.
      paths: glob patterns (or plain paths); for `format='seqio'` the registered Task or Mixture
        name (a single string).
      format: 'jsonl' (plain, .gz or .zst, chosen by file suffix), 'parquet', 'arrayrecord' or
        'seqio'.
      field: what to read from each record. A key holding a string (pre-training text, e.g.
        'text'), a key holding a chat `messages` list (SFT, e.g. 'messages'), three keys joined by
        '/' for preference pairs (DPO, 'prompt/chosen/rejected'), or 'tokens' for records that
        already are token ids (ArrayRecord shards written by `qwen_jax.data.prepare`, or a seqio
        feature of int ids).
      shuffle_window: None shuffles globally (the default; right for random-access JSONL and
        ArrayRecord). An int shuffles within windows of that many consecutive records, which keeps
        reads local (use it for Parquet, where a record read costs a row-group read).
      max_bad_fraction: the run fails once more than this fraction of this source's records were
        bad (malformed JSON, non-UTF-8, empty, unknown role, missing field).
      seqio_split: the split a seqio Task/Mixture is read from.
      score_field: a numeric record field to select documents by (e.g. `perplexity` or
        `quality_rating`, written by `python -m qwen_jax.data.quality`); a record without it is
        a bad record.
      min_score / max_score: documents with `min_score <= score < max_score` are read, the
        others skipped (not counted as bad). Several sources over the same scored files with
        adjacent ranges are score buckets, and a stage's mixture weights them.
    """

    name: str
    paths: Sequence[str] | str
    format: str = "jsonl"
    field: str = "text"
    shuffle_window: int | None = None
    max_bad_fraction: float = 0.01
    seqio_split: str = "train"
    score_field: str | None = None
    min_score: float | None = None
    max_score: float | None = None

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ValueError(
                f"Source {self.name!r}: format {self.format!r} is not one of {FORMATS}"
            )
        if isinstance(self.paths, str):
            object.__setattr__(self, "paths", (self.paths,))
        else:
            object.__setattr__(self, "paths", tuple(self.paths))
        if not self.paths:
            raise ValueError(f"Source {self.name!r}: no paths given")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError(f"Source {self.name!r}: max_bad_fraction must be in [0, 1]")
        has_range = self.min_score is not None or self.max_score is not None
        if has_range != (self.score_field is not None):
            raise ValueError(
                f"Source {self.name!r}: score_field and a min_score or max_score go together"
            )

    def in_score_range(self, score: float) -> bool:
        return (self.min_score is None or score >= self.min_score) and (
            self.max_score is None or score < self.max_score
        )


@dataclasses.dataclass(frozen=True)
class DataStage:
    """A phase of pre-training with its own sequence length, global batch and mixture.

    Attributes:
      name: shown in logs and exposed as `iterator.stage.name`.
      steps: how many batches this stage lasts; None for the last stage means "until stopped".
      seq_len: tokens per row.
      batch_size: the global batch; each host gets batch_size / shard_count rows.
      mixture: source name -> weight (weights need not sum to 1; they are normalized).
    """

    name: str
    steps: int | None
    seq_len: int
    batch_size: int
    mixture: Mapping[str, float]

    def __post_init__(self):
        if self.steps is not None and self.steps <= 0:
            raise ValueError(f"DataStage {self.name!r}: steps must be positive or None")
        if self.seq_len <= 0 or self.batch_size <= 0:
            raise ValueError(f"DataStage {self.name!r}: seq_len and batch_size must be positive")
        weights = {k: float(v) for k, v in dict(self.mixture).items() if float(v) != 0.0}
        if not weights or any(w < 0 for w in weights.values()):
            raise ValueError(
                f"DataStage {self.name!r}: mixture needs positive weights, got {self.mixture}"
            )
        object.__setattr__(self, "mixture", weights)


def check_stages(stages: Sequence[DataStage], sources: Mapping[str, Source]) -> None:
    """Fails early, naming the stage, when a schedule refers to unknown sources."""
    if not stages:
        raise ValueError("At least one DataStage is needed")
    for i, stage in enumerate(stages):
        missing = sorted(set(stage.mixture) - set(sources))
        if missing:
            raise ValueError(
                f"DataStage {stage.name!r} mixes unknown sources {missing}; known: {sorted(sources)}"
            )
        if stage.steps is None and i != len(stages) - 1:
            raise ValueError(f"DataStage {stage.name!r}: only the last stage may have steps=None")
