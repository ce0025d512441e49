"""Joining the other processes of a run (`jax.distributed`), before anything touches a device.

On TPU VMs and under Slurm, JAX finds the coordinator, the process count and this process's index
itself (`--multihost`); elsewhere (a local multi-process run, another cluster) they are given
(`--coordinator_address`, `--num_processes`, `--process_id`). Every process sends heartbeats to
the coordinator; when one stops (killed, crashed, its host gone) for `--peer_timeout_s`, the
coordination service ends every other process with a message naming the silent process
("The following tasks are unhealthy (stopped sending heartbeats): 1"), instead of leaving them
blocked in a collective. The same timeout bounds the wait at start for a peer that never comes.
"""

from __future__ import annotations

import os

from absl import flags, logging

MULTIHOST = flags.DEFINE_bool(
    "multihost",
    False,
    "join the other hosts of a TPU slice or GPU cluster (jax.distributed); without "
    "--coordinator_address the coordinator, process count and index come from the TPU metadata "
    "or Slurm",
)
COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0's coordinator (implies --multihost)"
)
NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "processes in the run")
PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index, 0 .. num_processes-1")
PEER_TIMEOUT = flags.DEFINE_integer(
    "peer_timeout_s",
    300,
    "a process that stops answering (or never starts) for this long ends every other one",
)


def initialize_from_flags() -> None:
    """Joins the run's other processes when the flags say there are any."""
    if not (MULTIHOST.value or COORDINATOR.value):
        return
    import jax

    if os.environ.get("JAX_PLATFORMS", "") == "cpu":
        # CPU collectives across processes (emulated meshes in tests) go through gloo.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=COORDINATOR.value,
        num_processes=NUM_PROCESSES.value,
        process_id=PROCESS_ID.value,
        initialization_timeout=PEER_TIMEOUT.value,
        heartbeat_timeout_seconds=PEER_TIMEOUT.value,
    )
    logging.info(
        "process %d of %d; a peer silent for %d s ends this process",
        jax.process_index(),
        jax.process_count(),
        PEER_TIMEOUT.value,
    )
