"""Exact resume: kill -9 mid-run, an interrupted async save, SIGTERM; all through the real CLI."""

import os
import signal
import time

import numpy as np
import pytest

import train_runs as runs

GIN = ["configs/demo/pretrain.gin"]
EVERY_7 = ["manager.CheckpointConfig.every_steps = 7"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return runs.write_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def reference_run(data, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    runs.run(workdir, GIN, runs.TINY_PRETRAIN + runs.data_params(data) + EVERY_7)
    return workdir


def _wait_for_step(workdir, proc, step, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"exited early: {proc.returncode}\n{proc.stderr.read()[-3000:]}")
        if max(runs.train_records(workdir), default=0) >= step:
            return
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout}s")


def _assert_same_run(workdir, reference):
    ours, theirs = runs.train_records(workdir), runs.train_records(reference)
    assert sorted(ours) == sorted(theirs) == list(range(1, 41))
    for step in ours:  # the loss curve, step by step, bit for bit
        assert ours[step]["loss"] == theirs[step]["loss"], step
        assert ours[step]["label"] == theirs[step]["label"], step
    a, b = runs.flat(runs.load_params(workdir, 40)), runs.flat(runs.load_params(reference, 40))
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_kill_9_then_resume_is_exact(data, reference_run, tmp_path):
    params = runs.TINY_PRETRAIN + runs.data_params(data) + EVERY_7
    proc = runs.start(tmp_path, GIN, params)
    _wait_for_step(tmp_path, proc, 23)
    proc.send_signal(signal.SIGKILL)  # no warning, no chance to save
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert max(runs.checkpoint_steps(tmp_path)) < 40
    runs.run(tmp_path, GIN, params)  # resumes from the newest complete checkpoint (stage 2)
    _assert_same_run(tmp_path, reference_run)

    # A save cut short: Orbax finalizes a step by renaming its temporary directory, so an
    # interrupted save is a temporary directory. The run must resume from the previous step.
    checkpoints = os.path.join(tmp_path, "checkpoints")
    os.rename(
        os.path.join(checkpoints, "40"),
        os.path.join(checkpoints, "40.orbax-checkpoint-tmp-1234567890"),
    )
    result = runs.run(tmp_path, GIN, params)
    assert "resumed from" in result.stderr and "/35" in result.stderr
    _assert_same_run(tmp_path, reference_run)


def test_sigterm_saves_the_current_step_and_exits_0(data, tmp_path):
    params = (
        runs.TINY_PRETRAIN
        + runs.data_params(data)
        + ["manager.CheckpointConfig.every_steps = 1000"]
    )
    proc = runs.start(tmp_path, GIN, params)
    _wait_for_step(tmp_path, proc, 3)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0, proc.stderr.read()[-3000:]
    last_logged = max(runs.train_records(tmp_path))
    assert 3 <= last_logged < 40
    assert runs.checkpoint_steps(tmp_path) == [last_logged]
