"""What every quality stage sees and implements.

A stage takes the documents of one chunk of the input that earlier stages kept, in input order,
and may add fields to their records or remove them with a named rule and a reason. Stages that
remember documents across chunks (deduplication) return what each chunk added to that memory
(`chunk_state()`, saved beside the chunk's output), so a run killed between chunks rebuilds
exactly what an uninterrupted run would have had, and the saved state grows with the chunk, not
with the corpus.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

from qwen_jax.parallel import host_data


@dataclasses.dataclass
class Document:
    """One input record in the pipeline.

    Attributes:
      record: every field of the input record; stages add theirs here, and this is what is
        written out.
      text: the record's text field.
      loc: where the record came from (`file:line`, `file:row N`).
      removed: (rule, reason) once a stage removed it.
    """

    record: dict[str, Any]
    text: str
    loc: str
    removed: tuple[str, str] | None = None

    def remove(self, rule: str, reason: str) -> None:
        self.removed = (rule, reason)


class Stage(Protocol):
    """A step of the quality pipeline (`run.run_pipeline` calls these in order)."""

    name: str

    def open(self, placement: host_data.Placement | None) -> None:
        """Loads what the stage needs (a model on the mesh); called once before the first chunk."""

    def process(self, docs: list[Document]) -> None:
        """Annotates or removes (`Document.remove`) the documents of one chunk, in place."""

    def score_fields(self) -> list[str]:
        """The record fields holding the scores this stage adds (histograms in the report)."""

    def chunk_state(self) -> Any:
        """What the last `process` call added to the stage's memory (picklable); None if nothing."""

    def restore(self, chunk_states: list[Any]) -> None:
        """Rebuilds the memory from every finished chunk's `chunk_state()`, in order."""


class StageDefaults:
    """`open`/`score_fields`/`state`/`restore` of a stage that needs no model, adds no score and
    remembers nothing across chunks (stages override what they need)."""

    def open(self, placement: host_data.Placement | None) -> None:
        del placement

    def score_fields(self) -> list[str]:
        return []

    def chunk_state(self) -> Any:
        return None

    def restore(self, chunk_states: list[Any]) -> None:
        del chunk_states
