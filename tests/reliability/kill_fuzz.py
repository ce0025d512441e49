"""kill -9 at many points of the tiny two-stage run's timeline, each followed by the same command
until it finishes; every run must end bit-identical to the uninterrupted one.

    python tests/reliability/kill_fuzz.py [--points=20] [--workdir=/tmp/kill_fuzz]

Point 0 lands while the run compiles (nothing logged yet), the last after the final save (step 40
on disk), the others when steps 2, 4, ... are logged (the checkpoints every 7 steps are saved
asynchronously, so some land during a save). Prints one line per point and a summary; exit 1 if
any run differs. tests/reliability/test_interruptions.py runs a handful of these points in CI.
"""

import argparse
import os
import pathlib
import shutil
import signal
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "train"))

import train_runs as runs  # noqa: E402


def kill_point(index: int, points: int):
    workdir_ready = {
        0: lambda w: (w / "run.json").exists(),
        points - 1: lambda w: (w / "checkpoints" / "40").exists(),
    }
    step = 2 * index
    return workdir_ready.get(index, lambda w: max(runs.train_records(w), default=0) >= step), (
        "compile" if index == 0 else "after final save" if index == points - 1 else f"step {step}"
    )


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--points", type=int, default=20)
    parser.add_argument("--workdir", default="/tmp/kill_fuzz")
    args = parser.parse_args()
    root = pathlib.Path(args.workdir)
    shutil.rmtree(root, ignore_errors=True)
    data = runs.write_data(root / "data")
    params = runs.tiny_pretrain(data)
    reference = root / "reference"
    runs.run(reference, runs.PRETRAIN_GIN, params)
    failures = 0
    for index in range(args.points):
        ready, where = kill_point(index, args.points)
        workdir = root / f"point{index}"
        with open(root / f"point{index}.log", "w") as log:
            proc = runs.start(workdir, runs.PRETRAIN_GIN, params, log=log)
            while not ready(workdir) and proc.poll() is None:
                time.sleep(0.01)
            killed_at = max(runs.train_records(workdir), default=0)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        result = runs.run(workdir, runs.PRETRAIN_GIN, params, check=False)
        try:
            assert result.returncode == 0, f"exit {result.returncode}"
            runs.assert_same_run(workdir, reference)
            verdict = "bit-identical"
        except AssertionError as e:
            failures += 1
            verdict = f"DIFFERS: {str(e).splitlines()[0]}"
        print(
            f"point {index:2d} ({where}, killed after step {killed_at}): exit {result.returncode}, {verdict}"
        )
        sys.stdout.flush()
    print(
        f"{args.points - failures}/{args.points} runs finished bit-identical to the uninterrupted run"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.exit(main())
