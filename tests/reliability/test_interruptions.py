"""What pods do to a run, through the real entry point on the tiny two-stage run: kill -9 at
several points of its timeline, a corrupt newest checkpoint, SIGTERM from start-up to teardown,
and re-running finished work. Every interrupted run must end exactly where the uninterrupted one
does (`train_runs.assert_same_run`)."""

import os
import pathlib
import shutil
import signal
import subprocess
import time

import pytest

import train_runs as runs

GIN = runs.PRETRAIN_GIN


def _start(workdir, params) -> subprocess.Popen:
    with open(workdir.parent / f"{workdir.name}.log", "a") as log:
        return runs.start(workdir, GIN, params, log=log)


def _kill_when(workdir, proc, ready, timeout=300) -> None:
    deadline = time.time() + timeout
    while not ready():
        if proc.poll() is not None:
            log = (workdir.parent / f"{workdir.name}.log").read_text()[-3000:]
            raise AssertionError(f"exited early: {proc.returncode}\n{log}")
        if time.time() > deadline:
            raise AssertionError("the kill point was not reached")
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_kill_9_at_points_of_the_timeline_then_resume(
    tiny_pretrain_data, tiny_pretrain_reference, tmp_path
):
    """One workdir killed again and again: while compiling (nothing logged yet), mid-run right
    after an async save started (step 14), in the second stage, and after the final save; each
    time the same command resumes, and the last run only sees that the work is done."""
    params = runs.tiny_pretrain(tiny_pretrain_data)
    steps = lambda: max(runs.train_records(tmp_path), default=0)  # noqa: E731
    checkpoints = tmp_path / "checkpoints"
    points = [
        lambda: (tmp_path / "run.json").exists(),  # set-up and compilation
        lambda: steps() >= 14,  # the save of step 14 is in flight
        lambda: steps() >= 27,  # stage 2, between checkpoints
        lambda: (checkpoints / "40").exists(),  # after the final save
    ]
    for ready in points:
        _kill_when(tmp_path, _start(tmp_path, params), ready)
    final = runs.run(tmp_path, GIN, params)
    runs.assert_same_run(tmp_path, tiny_pretrain_reference)
    again = runs.run(tmp_path, GIN, params)
    assert "is complete at step 40: nothing to do" in again.stderr, final.stderr[-2000:]
    # Readable by other users, like any file the umask lets through.
    for path in [checkpoints / "40", *(checkpoints / "40").rglob("*")]:
        mode = path.stat().st_mode
        assert mode & (0o005 if path.is_dir() else 0o004), (path, oct(mode))


def _ocdbt_data_files(item: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p for p in item.rglob("*") if p.is_file() and p.parent.name == "d")


def _truncate(path: pathlib.Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


CORRUPTIONS = {
    "truncated_params_data": lambda step: [
        _truncate(p) for p in _ocdbt_data_files(step / "params")
    ],
    "deleted_opt_state_data": lambda step: [
        p.unlink() for p in _ocdbt_data_files(step / "opt_state")
    ],
    "empty_step_directory": lambda step: [
        shutil.rmtree(p) if p.is_dir() else p.unlink() for p in step.iterdir()
    ],
    "missing_train_meta": lambda step: shutil.rmtree(step / "train_meta"),
    "missing_manifest": lambda step: (step / "params" / "manifest.ocdbt").unlink(),
}


@pytest.fixture(scope="module")
def stopped_at_21(tiny_pretrain_data, tmp_path_factory):
    """A run stopped after step 21 (checkpoints 7, 14, 21)."""
    workdir = tmp_path_factory.mktemp("stopped_at_21")
    runs.run(
        workdir, GIN, runs.tiny_pretrain(tiny_pretrain_data, "setup.RunConfig.total_steps = 21")
    )
    assert runs.checkpoint_steps(workdir) == [7, 14, 21]
    return workdir


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_a_corrupt_newest_checkpoint_is_set_aside(
    corruption, stopped_at_21, tiny_pretrain_data, tiny_pretrain_reference, tmp_path
):
    workdir = tmp_path / "w"
    shutil.copytree(stopped_at_21, workdir)
    CORRUPTIONS[corruption](workdir / "checkpoints" / "21")
    result = runs.run(workdir, GIN, runs.tiny_pretrain(tiny_pretrain_data))
    skipped = [line for line in result.stderr.splitlines() if "does not restore" in line]
    assert len(skipped) == 1 and "step 21" in skipped[0], result.stderr[-3000:]
    assert "resumed from" in result.stderr and "/14 " in result.stderr
    assert (workdir / "checkpoints" / "corrupt" / "21").is_dir()  # kept, not deleted
    runs.assert_same_run(workdir, tiny_pretrain_reference)


def test_no_checkpoint_that_restores_is_one_error_and_no_restart(
    stopped_at_21, tiny_pretrain_data, tmp_path
):
    workdir = tmp_path / "w"
    shutil.copytree(stopped_at_21, workdir)
    for step in (7, 14, 21):
        CORRUPTIONS["missing_train_meta"](workdir / "checkpoints" / str(step))
    result = runs.run(workdir, GIN, runs.tiny_pretrain(tiny_pretrain_data), check=False)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 1 and len(errors) == 1, result.stderr[-3000:]
    assert "no checkpoint" in errors[0] and "21" in errors[0]
    assert "Traceback" not in result.stderr
    assert runs.checkpoint_steps(workdir) == [7, 14, 21]  # nothing moved, nothing trained


_started = [0.0]
SIGTERM_MOMENTS = {
    # (when to send it, whether a step has run by then). Start-up: a second in, the process is
    # importing JAX (the interpreter itself needs a few milliseconds before any handler exists).
    "start_up": (lambda workdir: time.time() > _started[0] + 1.0, False),
    "compiling": (lambda workdir: (workdir / "run.json").exists(), False),
    "mid_run": (lambda workdir: max(runs.train_records(workdir), default=0) >= 4, True),
    "final_save": (lambda workdir: max(runs.train_records(workdir), default=0) >= 10, True),
    "teardown": (lambda workdir: (workdir / "checkpoints" / "10").exists(), True),
}


@pytest.mark.parametrize("moment", sorted(SIGTERM_MOMENTS))
def test_sigterm_at_any_moment_exits_0(moment, tiny_pretrain_data, tmp_path):
    ready, stepped = SIGTERM_MOMENTS[moment]
    params = runs.tiny_pretrain(tiny_pretrain_data, "setup.RunConfig.total_steps = 10")
    _started[0] = time.time()
    proc = _start(tmp_path, params)
    deadline = time.time() + 300
    while not ready(tmp_path) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 0, (tmp_path.parent / f"{tmp_path.name}.log").read_text()
    steps = runs.checkpoint_steps(tmp_path) if (tmp_path / "checkpoints").exists() else []
    if stepped:
        assert steps and steps[-1] == max(runs.train_records(tmp_path)), steps
    if not runs.train_records(tmp_path):
        assert steps == [], steps


def test_failures_are_one_error_line(tiny_pretrain_data, tmp_path):
    params = runs.tiny_pretrain(tiny_pretrain_data, "setup.RunConfig.total_steps = 2")

    def fails(workdir, gin_files, params, match):
        result = runs.run(workdir, gin_files, params, check=False)
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert result.returncode == 1 and len(errors) == 1, result.stderr[-3000:]
        assert match in errors[0], errors[0]

    fails(tmp_path / "a", ["configs/demo/nonexistent.gin"], params, "nonexistent.gin: not found")
    bad_gin = tmp_path / "bad.gin"
    bad_gin.write_text("setup.RunConfig.log_every = (\n")
    fails(tmp_path / "a", [*GIN, str(bad_gin)], params, "bad.gin")
    assert not (tmp_path / "a").exists()

    runs.run(tmp_path / "b", GIN, params)
    (tmp_path / "b" / "run.json").write_text('{"task": "pre')  # cut short by a full disk
    fails(tmp_path / "b", GIN, params, "run.json is not a readable run file")

    # A workdir whose checkpoints cannot be written (an empty directory nobody, not even root,
    # can write into): refused, named, before the first step.
    unwritable = pathlib.Path("/proc/driver")
    if not unwritable.is_dir() or any(unwritable.iterdir()) or _writable(unwritable):
        pytest.skip(f"{unwritable} is not an empty unwritable directory here")
    (tmp_path / "c").mkdir()
    os.symlink(unwritable, tmp_path / "c" / "checkpoints")
    fails(tmp_path / "c", GIN, params, "cannot write checkpoints")


def _writable(directory: pathlib.Path) -> bool:
    try:
        (directory / "probe").mkdir()
    except OSError:
        return False
    (directory / "probe").rmdir()
    return True


def test_a_full_disk_is_one_error_line(tiny_pretrain_data, tmp_path):
    """Checkpoints on a 1.5 MB tmpfs: the first save fits, a later one runs out of space."""
    checkpoints = tmp_path / "w" / "checkpoints"
    checkpoints.mkdir(parents=True)
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1500k", "tmpfs", str(checkpoints)],
        capture_output=True,
    )
    if mount.returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        result = runs.run(tmp_path / "w", GIN, runs.tiny_pretrain(tiny_pretrain_data), check=False)
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert result.returncode == 1 and len(errors) == 1, result.stderr[-3000:]
        assert str(checkpoints) in errors[0], errors[0]
    finally:
        subprocess.run(["umount", str(checkpoints)], check=True)
