"""The stage schedule of pre-training as one resumable iterator.

Each stage is its own Grain pipeline (its mixture, sequence length and batch size); the schedule
iterator counts batches, switches to the next stage once the current one has produced its
`steps` batches, and checkpoints the stage index together with the current pipeline's state.
Stage pipelines are seeded by stage name, so the switch is a pure function of the step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import grain
from absl import logging

from qwen_jax.data.bad_records import BadRecordTracker
from qwen_jax.data.config import DataStage


class StagedIterator(grain.DatasetIterator):
    """Yields the batches of `stages` in order; `build(stage)` makes a stage's Grain dataset.

    `stage`/`stage_index` describe the stage the *next* batch comes from (the switch happens right
    after a stage's last batch, so the trainer can see a change of shape coming).
    `step` counts batches produced since the start of the schedule.
    """

    def __init__(
        self,
        stages: Sequence[DataStage],
        build: Callable[[DataStage], grain.IterDataset],
        bad_records: BadRecordTracker | None = None,
    ):
        super().__init__()
        self._stages = list(stages)
        self._build = build
        self.bad_records = bad_records
        self._stage_index = 0
        self._step = 0
        self._step_in_stage = 0
        self._inner = iter(build(self._stages[0]))

    @property
    def stages(self) -> list[DataStage]:
        return list(self._stages)

    @property
    def stage_index(self) -> int:
        return self._stage_index

    @property
    def stage(self) -> DataStage:
        return self._stages[self._stage_index]

    @property
    def step(self) -> int:
        return self._step

    def _enter(self, index: int) -> None:
        self._inner.close()
        self._stage_index = index
        self._step_in_stage = 0
        self._inner = iter(self._build(self._stages[index]))
        logging.info("data: entering stage %d %r at step %d", index, self.stage.name, self._step)

    def __next__(self) -> dict[str, Any]:
        steps = self.stage.steps
        if steps is not None and self._step_in_stage >= steps:
            raise StopIteration  # the last stage has run its course
        batch = next(self._inner)
        self._step += 1
        self._step_in_stage += 1
        if self._step_in_stage == steps and self._stage_index + 1 < len(self._stages):
            self._enter(self._stage_index + 1)
        return batch

    def get_state(self) -> dict[str, Any]:
        return {
            "stage_index": self._stage_index,
            "stage_name": self.stage.name,
            "step": self._step,
            "step_in_stage": self._step_in_stage,
            "stage_state": self._inner.get_state(),
            **({"bad_records": self.bad_records.state()} if self.bad_records else {}),
        }

    def set_state(self, state: dict[str, Any]) -> None:
        index = state["stage_index"]
        if not 0 <= index < len(self._stages) or self._stages[index].name != state["stage_name"]:
            raise ValueError(
                f"Checkpointed data stage {index} {state['stage_name']!r} does not match "
                f"the configured stages {[s.name for s in self._stages]}"
            )
        if index != self._stage_index or self._step_in_stage:
            self._enter(index)
        self._step = state["step"]
        self._step_in_stage = state["step_in_stage"]
        self._inner.set_state(state["stage_state"])
        if self.bad_records is not None and "bad_records" in state:
            self.bad_records.restore(state["bad_records"])

    def start_prefetch(self) -> None:
        self._inner.start_prefetch()

    def close(self) -> None:
        # Also reached from __del__ when building the first stage failed.
        if getattr(self, "_inner", None) is not None:
            self._inner.close()
        super().close()
