"""A multi-process run on this machine: N training processes, each with D emulated CPU devices,
joined through a local coordinator, as the hosts of a pod would be.

  python -m qwen_jax.launch.local --num_processes=2 --devices_per_process=4 -- \\
      --gin_file=configs/demo/pretrain.gin --workdir=/tmp/run

Every process runs `python -m qwen_jax.train` (or `--module`, e.g. `qwen_jax.export`) with the
flags after `--` and the `qwen_jax.launch.distributed` flags that join it to the others; their
output is streamed line by line with a `[i]` prefix. The launcher exits 0 when every process did, and
otherwise with 1 after one line per failed process (its exit status or the signal that ended it).
SIGINT/SIGTERM are passed on to every process.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading

from absl import app, flags

_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 2, "training processes to start")
_DEVICES = flags.DEFINE_integer("devices_per_process", 4, "emulated CPU devices per process")
_MODULE = flags.DEFINE_string("module", "qwen_jax.train", "the entry point every process runs")
_PEER_TIMEOUT = flags.DEFINE_integer(
    "peer_timeout_s", 60, "passed to every process: how long a silent peer is waited for"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def commands(
    module: str, args, num_processes: int, port: int, peer_timeout_s: int
) -> list[list[str]]:
    return [
        [
            sys.executable,
            "-u",
            "-m",
            module,
            *args,
            f"--coordinator_address=localhost:{port}",
            f"--num_processes={num_processes}",
            f"--process_id={index}",
            f"--peer_timeout_s={peer_timeout_s}",
        ]
        for index in range(num_processes)
    ]


def _stream(index: int, pipe) -> None:
    for line in pipe:
        sys.stdout.write(f"[{index}] {line}")
        sys.stdout.flush()


def _describe(code: int) -> str:
    if code < 0:
        return f"was ended by signal {signal.Signals(-code).name}"
    return f"exited with status {code}"


def run(
    module: str, args, num_processes: int, devices_per_process: int, peer_timeout_s: int
) -> int:
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_per_process}",
    }
    port = _free_port()
    processes = [
        subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for command in commands(module, args, num_processes, port, peer_timeout_s)
    ]

    def forward(signum, frame):
        for process in processes:
            if process.poll() is None:
                process.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    streams = [
        threading.Thread(target=_stream, args=(i, p.stdout), daemon=True)
        for i, p in enumerate(processes)
    ]
    for thread in streams:
        thread.start()
    codes = [process.wait() for process in processes]
    for thread in streams:
        thread.join()
    failed = [(i, code) for i, code in enumerate(codes) if code != 0]
    for index, code in failed:
        print(f"error: process {index} of {num_processes} {_describe(code)}", file=sys.stderr)
    return 1 if failed else 0


def main(argv) -> None:
    sys.exit(
        run(_MODULE.value, argv[1:], _NUM_PROCESSES.value, _DEVICES.value, _PEER_TIMEOUT.value)
    )


if __name__ == "__main__":
    app.run(main)
