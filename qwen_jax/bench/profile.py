"""Where a compiled step's time goes: a JAX profiler trace of a few calls, summed per XLA op.

Each op's events are summed over every thread of the trace and divided by the number of calls,
so on a multi-core CPU the per-op seconds add up to more than the wall time. Ops are also
grouped by kind (the name without its numeric suffix: all `ynn_fusion.N` are matmuls on XLA's
CPU backend, `copy_*` are transposes). On a host with libtpu installed, run with
JAX_PLATFORMS=cpu (libtpu's profiler plugin crashes when it finds no TPU).
"""

from __future__ import annotations

import collections
import glob
import os
import re
import tempfile

import jax

# Trace events that are not XLA ops: executors, waits and the Python side.
_NOT_OPS = re.compile(r"ThunkExecutor|Await|block_until_ready|stop_trace|^while|^\$")


def op_summary(run_once, calls: int = 2, top: int = 15) -> dict:
    """Per-op seconds per call of `run_once()` (which must block until its results are ready)."""
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir)
        for _ in range(calls):
            run_once()
        jax.profiler.stop_trace()
        (path,) = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
        data = jax.profiler.ProfileData.from_file(path)
    seconds, counts = collections.Counter(), collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            if line.name == "python":
                continue
            for event in line.events:
                if not _NOT_OPS.search(event.name):
                    seconds[event.name] += event.duration_ns / 1e9 / calls
                    counts[event.name] += 1
    kinds = collections.Counter()
    for name, value in seconds.items():
        kinds[name.rstrip(".0123456789")] += value
    return {
        "op_seconds_per_call": round(sum(seconds.values()), 3),
        "by_kind": {kind: round(value, 3) for kind, value in kinds.most_common(top)},
        "top_ops": [
            [name, round(value, 4), counts[name] // calls]
            for name, value in seconds.most_common(top)
        ],
    }
