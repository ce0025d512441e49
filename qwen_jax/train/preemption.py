"""SIGTERM (TPU VM maintenance, spot preemption, `kill`) becomes "save at the next step boundary
and exit 0". The handler only sets a flag; the loop acts on it between steps.

The entry point installs the handler first thing (`install()`), and it stays until the process
exits, so a SIGTERM during start-up (before any step: nothing to save) or during teardown (the
final save, the closing evaluation) never kills the process half-way.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

_state = {"installed": False, "requested": False}


def _handle(signum, frame) -> None:
    del signum, frame
    _state["requested"] = True


def install() -> None:
    """Handles SIGTERM from now until the process exits."""
    signal.signal(signal.SIGTERM, _handle)
    _state["installed"] = True


def requested() -> bool:
    return _state["requested"]


@contextlib.contextmanager
def handled() -> Iterator[None]:
    """SIGTERM handled within the block; the previous handler comes back after it unless the
    process installed ours for good (`install`)."""
    if _state["installed"]:
        yield
        return
    previous = signal.signal(signal.SIGTERM, _handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def should_stop(step: int) -> bool:
    """True on every host at the same step once any host was told to stop."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        # JAX's preemption sync service agrees on one step across hosts.
        return requested() or multihost_utils.reached_preemption_sync_point(step)
    return requested()
