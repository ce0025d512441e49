"""Training checkpoints: an Orbax CheckpointManager over `workdir/checkpoints/<step>/`.

Each step directory holds the items of a model checkpoint (`params`, `model_config`: the layout of
`qwen_jax.checkpoint.model_io`, so `qwen_jax.export` reads a step directory as it is) plus what
an exact resume needs: `opt_state`, `frozen` (e.g. the DPO reference, when there is one),
`train_meta` (step, stage, RNG) and `data_state` (the input iterator's state).

Saves are asynchronous; Orbax writes into a temporary directory and renames it when complete, so
a process killed mid-save leaves the previous complete checkpoint as the newest one. Restores
take abstract targets carrying the *current* shardings, so a checkpoint written on one mesh
restores onto another.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp

PARAMS, MODEL_CONFIG, OPT_STATE, FROZEN, TRAIN_META, DATA_STATE = (
    "params",
    "model_config",
    "opt_state",
    "frozen",
    "train_meta",
    "data_state",
)
ITEMS = (PARAMS, MODEL_CONFIG, OPT_STATE, FROZEN, TRAIN_META, DATA_STATE)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """When to save and what to keep.

    every_steps: save every N steps (plus the last step, and on SIGTERM).
    keep_last: keep the newest K checkpoints ...
    keep_every: ... and every M-th step for good (None: none kept beyond the newest K).
    async_save: write in a background thread while training goes on.
    """

    every_steps: int = 1000
    keep_last: int = 3
    keep_every: int | None = None
    async_save: bool = True

    def __post_init__(self):
        if self.every_steps <= 0 or self.keep_last <= 0:
            raise ValueError("CheckpointConfig: every_steps and keep_last must be positive")


def _abstract(tree):
    """ShapeDtypeStructs with shardings: where and how a restore should place each array."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


CORRUPT = "corrupt"  # where steps that do not restore are moved, beside the steps


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read back; the message names the step."""


class TrainCheckpointer:
    def __init__(self, directory: str, config: CheckpointConfig):
        self.config = config
        self.directory = os.path.abspath(directory)
        preservation = [ocp.checkpoint_managers.LatestN(config.keep_last)]
        if config.keep_every:
            preservation.append(ocp.checkpoint_managers.EveryNSteps(config.keep_every))
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=config.async_save,
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(preservation),
            cleanup_tmp_directories=True,
            create=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)
        self._check_writable()

    def _check_writable(self) -> None:
        """Fails at once, in one line, where saves could not be written: otherwise the first
        asynchronous save would fail in a background thread, reported a step later."""
        # One probe per process: hosts sharing a file system must not remove each other's.
        probe = os.path.join(self.directory, f".write-probe-{jax.process_index()}")
        try:
            os.makedirs(probe, exist_ok=True)
            os.rmdir(probe)
        except OSError as e:
            raise CheckpointError(
                f"cannot write checkpoints under {self.directory}: {e.strerror or e}"
            ) from None

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def steps(self) -> list[int]:
        """The complete steps, newest first."""
        return sorted(self._manager.all_steps(), reverse=True)

    def set_aside(self, step: int) -> str:
        """Moves a step that does not restore into `corrupt/` (kept for inspection, never
        deleted); returns where it went."""
        target = os.path.join(self.directory, CORRUPT, str(step))
        n = 1
        while os.path.exists(target):
            target = os.path.join(self.directory, CORRUPT, f"{step}.{n}")
            n += 1
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.move(os.path.join(self.directory, str(step)), target)
        self._manager.reload()
        return target

    def check_for_errors(self) -> None:
        """Raises, as one CheckpointError, the failure of a finished asynchronous save."""
        try:
            self._manager.check_for_errors()
        except Exception as e:  # whatever the storage raised in the save thread
            raise CheckpointError(f"saving a checkpoint under {self.directory} failed: {e}") from e

    def should_save(self, step: int) -> bool:
        return step % self.config.every_steps == 0

    def save(
        self,
        step: int,
        *,
        params,
        opt_state,
        frozen,
        model_config: dict,
        meta: dict,
        data_state: dict,
    ) -> None:
        """Starts a save of `step` (returns before it is written when saves are async)."""
        if step in self._manager.all_steps():
            return
        items = {
            PARAMS: ocp.args.StandardSave(params),
            MODEL_CONFIG: ocp.args.JsonSave(model_config),
            OPT_STATE: ocp.args.StandardSave(opt_state),
            TRAIN_META: ocp.args.JsonSave(meta),
            DATA_STATE: ocp.args.JsonSave(data_state),
        }
        if frozen is not None:
            items[FROZEN] = ocp.args.StandardSave(frozen)
        self._manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, step: int, *, params, opt_state, frozen) -> dict[str, Any]:
        """Restores `step` into the shapes, dtypes and shardings of the given (current) trees."""
        items = {
            PARAMS: ocp.args.StandardRestore(_abstract(params)),
            MODEL_CONFIG: ocp.args.JsonRestore(),
            OPT_STATE: ocp.args.StandardRestore(_abstract(opt_state)),
            TRAIN_META: ocp.args.JsonRestore(),
            DATA_STATE: ocp.args.JsonRestore(),
        }
        if frozen is not None:
            items[FROZEN] = ocp.args.StandardRestore(_abstract(frozen))
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        missing = [name for name in items if restored[name] is None]
        if missing:
            raise CheckpointError(f"step {step} has no {', '.join(missing)}")
        return {name: restored[name] for name in items}

    def close(self) -> None:
        try:
            self._manager.wait_until_finished()
            self._manager.close()
        except Exception as e:  # the last asynchronous save failed
            raise CheckpointError(f"saving a checkpoint under {self.directory} failed: {e}") from e
