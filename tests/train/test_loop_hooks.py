"""The loop's periodic hooks through the real entry point: a profiler trace of chosen steps, and
nan_policy='stop' keeping the last good checkpoint."""

import glob
import os

import numpy as np

import train_runs as runs

PRETRAIN = ["configs/demo/pretrain.gin"]


def test_profile_steps_write_a_trace(tmp_path):
    data = runs.write_data(tmp_path / "data")
    params = (
        runs.TINY_PRETRAIN
        + runs.data_params(data)
        + ["setup.RunConfig.total_steps = 4", "setup.RunConfig.profile_steps = (2, 1)"]
    )
    runs.run(tmp_path / "run", PRETRAIN, params)
    traces = glob.glob(str(tmp_path / "run" / "profile" / "**" / "*.xplane.pb"), recursive=True)
    assert len(traces) == 1 and os.path.getsize(traces[0]) > 0, traces


def test_nan_policy_stop_exits_nonzero_and_keeps_the_last_good_checkpoint(tmp_path):
    data = runs.write_data(tmp_path / "data")
    # A learning rate of 1e30 leaves finite but huge parameters after step 1, so the loss of
    # step 2 overflows to a non-finite value.
    params = (
        runs.TINY_PRETRAIN
        + runs.data_params(data)
        + [
            "setup.RunConfig.total_steps = 6",
            "setup.RunConfig.nan_policy = 'stop'",
            "optimizer.warmup_stable_decay.warmup_steps = 0",
            "optimizer.warmup_stable_decay.peak_lr = 1e30",
            "manager.CheckpointConfig.every_steps = 1",
        ]
    )
    result = runs.run(tmp_path / "run", PRETRAIN, params, check=False)
    assert result.returncode != 0
    assert "non-finite loss or gradients at step 2" in result.stderr
    assert runs.checkpoint_steps(tmp_path / "run") == [1]
    saved = runs.flat(runs.load_params(tmp_path / "run", 1))
    assert all(np.isfinite(v).all() for v in saved.values())
