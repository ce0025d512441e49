"""SIGTERM (TPU VM maintenance, spot preemption, `kill`) becomes "save at the next step boundary
and exit 0": the handler only sets a flag, the loop acts on it between steps."""

from __future__ import annotations

import signal

import jax
from jax.experimental import multihost_utils


class PreemptionWatcher:
    def __init__(self):
        self._requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        del signum, frame
        self._requested = True

    def should_stop(self, step: int) -> bool:
        """True on every host at the same step once any host was told to stop."""
        if jax.process_count() > 1:
            # JAX's preemption sync service agrees on one step across hosts.
            return self._requested or multihost_utils.reached_preemption_sync_point(step)
        return self._requested

    def close(self) -> None:
        signal.signal(signal.SIGTERM, self._previous)
