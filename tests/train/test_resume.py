"""Exact resume: kill -9 mid-run, an interrupted async save, SIGTERM; all through the real CLI."""

import os
import signal

import pytest

import train_runs as runs

GIN = runs.PRETRAIN_GIN
EVERY_7 = runs.EVERY_7


@pytest.fixture
def data(tiny_pretrain_data):
    return tiny_pretrain_data


@pytest.fixture
def reference_run(tiny_pretrain_reference):
    return tiny_pretrain_reference


def test_kill_9_then_resume_is_exact(data, reference_run, tmp_path):
    params = runs.TINY_PRETRAIN + runs.data_params(data) + EVERY_7
    proc = runs.start(tmp_path, GIN, params)
    runs.wait_for_step(tmp_path, proc, 23)
    proc.send_signal(signal.SIGKILL)  # no warning, no chance to save
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert max(runs.checkpoint_steps(tmp_path)) < 40
    runs.run(tmp_path, GIN, params)  # resumes from the newest complete checkpoint (stage 2)
    runs.assert_same_run(tmp_path, reference_run)

    # A save cut short: Orbax finalizes a step by renaming its temporary directory, so an
    # interrupted save is a temporary directory. The run must resume from the previous step.
    checkpoints = os.path.join(tmp_path, "checkpoints")
    os.rename(
        os.path.join(checkpoints, "40"),
        os.path.join(checkpoints, "40.orbax-checkpoint-tmp-1234567890"),
    )
    result = runs.run(tmp_path, GIN, params)
    assert "resumed from" in result.stderr and "/35" in result.stderr
    runs.assert_same_run(tmp_path, reference_run)


def test_sigterm_saves_the_current_step_and_exits_0(data, tmp_path):
    params = (
        runs.TINY_PRETRAIN
        + runs.data_params(data)
        + ["manager.CheckpointConfig.every_steps = 1000"]
    )
    proc = runs.start(tmp_path, GIN, params)
    runs.wait_for_step(tmp_path, proc, 3)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0, proc.stderr.read()[-3000:]
    last_logged = max(runs.train_records(tmp_path))
    assert 3 <= last_logged < 40
    assert runs.checkpoint_steps(tmp_path) == [last_logged]
