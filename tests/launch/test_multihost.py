"""Two processes x 4 emulated CPU devices, joined by `qwen_jax.launch.local`, train as one
8-device process does: the same losses, a kill -9 resumed with every process's data position,
a checkpoint that restores in one 4-device process, an export equal to a single-process one; and
a killed peer ends the other process instead of leaving it blocked."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import safetensors.numpy

import train_runs

TOLERANCE = 1e-5
# The tiny two-stage run with 8 rows a step (divisible by the 8 devices), 12 steps, checkpoints
# every 2 steps, on a data=2 x fsdp=4 mesh, its data in 2 shards (one per process).
BINDINGS = [
    "stage1/config.DataStage.batch_size = 8",
    "stage2/config.DataStage.batch_size = 8",
    "STAGE1_STEPS = 6",
    "STAGE2_STEPS = 6",
    "optimizer.warmup_stable_decay.warmup_steps = 3",
    "optimizer.warmup_stable_decay.stable_steps = 5",
    "DECAY_STEPS = 4",
    "manager.CheckpointConfig.every_steps = 2",
    "manager.CheckpointConfig.keep_last = 10",
    "setup.RunConfig.data_shards = 2",
    "tasks.PretrainTask.eval_source = %PRETRAIN_EVAL_TEXT",
    "setup.RunConfig.eval_every = 5",
]
MESH_8 = ["mesh.MeshConfig.data = 2", "mesh.MeshConfig.fsdp = 4"]


def _env(devices: int) -> dict:
    return {**train_runs.env(), "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}


def _launch(args, *, module="qwen_jax.train", peer_timeout_s=60, processes=2, devices=4):
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "qwen_jax.launch.local",
            f"--num_processes={processes}",
            f"--devices_per_process={devices}",
            f"--module={module}",
            f"--peer_timeout_s={peer_timeout_s}",
            "--",
            *args,
        ],  # fmt: skip
        cwd=train_runs.REPO_ROOT,
        env=train_runs.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # so that a test can kill the whole run
    )


def _train_args(workdir, params):
    return train_runs.command(workdir, train_runs.PRETRAIN_GIN, params)[3:]


def _finish(process, timeout=600) -> str:
    out, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, out[-5000:]
    return out


def _losses(workdir, split="train") -> dict[int, float]:
    return {step: r["loss"] for step, r in train_runs.train_records(workdir, split).items()}


def _close(ours: dict, reference: dict, steps) -> None:
    for step in steps:
        assert abs(ours[step] - reference[step]) <= TOLERANCE, (step, ours[step], reference[step])


def _wait_for_step(workdir, step: int, process, timeout=300) -> None:
    deadline = time.monotonic() + timeout
    while max(train_runs.train_records(workdir), default=0) < step:
        assert process.poll() is None, process.stdout.read()[-5000:]
        assert time.monotonic() < deadline, f"step {step} not reached"
        time.sleep(0.2)


def _export(checkpoint, output, *, processes: int) -> dict[str, np.ndarray]:
    args = [f"--checkpoint={checkpoint}", f"--output_dir={output}", "--dtype=float32",
            "--gin_file=configs/mesh/fsdp.gin"]  # fmt: skip
    if processes == 1:
        subprocess.run(
            [sys.executable, "-m", "qwen_jax.export", *args],
            cwd=train_runs.REPO_ROOT, env=_env(8), check=True, capture_output=True,
        )  # fmt: skip
    else:
        _finish(_launch(args, module="qwen_jax.export"))
    tensors = {}
    for name in sorted(os.listdir(output)):
        if name.endswith(".safetensors"):
            tensors.update(safetensors.numpy.load_file(os.path.join(output, name)))
    return tensors


def test_two_processes_train_resume_restore_and_export_as_one(tiny_pretrain_data, tmp_path):
    params = train_runs.tiny_pretrain(tiny_pretrain_data, *BINDINGS)
    reference = tmp_path / "one_process"
    train_runs.run(reference, train_runs.PRETRAIN_GIN, params + MESH_8, extra_env=_env(8))
    want, want_eval = _losses(reference), _losses(reference, "eval")
    assert sorted(want) == list(range(1, 13)) and sorted(want_eval) == [0, 5, 10, 12]

    # Two processes, killed with SIGKILL once step 6 is logged, then resumed to step 10.
    workdir = tmp_path / "two_processes"
    args = _train_args(workdir, params + MESH_8 + ["setup.RunConfig.total_steps = 10"])
    run = _launch(args)
    _wait_for_step(workdir, 6, run)
    os.killpg(run.pid, signal.SIGKILL)
    run.wait()
    saved = [int(n) for n in os.listdir(workdir / "checkpoints") if n.isdigit()]
    assert max(saved) < 10, saved  # the resumed run has steps left to do
    _finish(_launch(args))
    _close(_losses(workdir), want, range(1, 11))
    # Each process evaluates its half of the held-out documents; the losses are global.
    _close(_losses(workdir, "eval"), want_eval, [0, 5, 10])

    # The same checkpoint continues in one process with 4 devices (both data shards there).
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    continued = params + ["mesh.MeshConfig.data = 2", "mesh.MeshConfig.fsdp = 2"]
    train_runs.run(workdir, train_runs.PRETRAIN_GIN, continued, extra_env=env)
    _close(_losses(workdir), want, range(11, 13))
    _close(_losses(workdir, "eval"), want_eval, [12])

    # The step-10 checkpoint exported by the two processes equals its single-process export.
    checkpoint = workdir / "checkpoints" / "10"
    two = _export(checkpoint, tmp_path / "export_two", processes=2)
    one = _export(checkpoint, tmp_path / "export_one", processes=1)
    assert sorted(two) == sorted(one) and len(one) > 10
    for name in one:
        np.testing.assert_array_equal(two[name], one[name], err_msg=name)


def test_a_killed_peer_ends_the_other_process(tiny_pretrain_data, tmp_path):
    workdir = tmp_path / "run"
    params = train_runs.tiny_pretrain(tiny_pretrain_data, *BINDINGS)
    run = _launch(_train_args(workdir, params + MESH_8), peer_timeout_s=10)
    _wait_for_step(workdir, 2, run)
    peer = subprocess.run(
        ["pgrep", "-f", f"workdir={workdir} .*--process_id=1"], capture_output=True, text=True
    ).stdout.split()
    assert len(peer) == 1, peer
    killed = time.monotonic()
    os.kill(int(peer[0]), signal.SIGKILL)
    try:
        out, _ = run.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(run.pid, signal.SIGKILL)
        pytest.fail("the surviving process did not stop")
    assert run.returncode == 1
    assert time.monotonic() - killed < 10 + 60
    assert "error: process 1 of 2 was ended by signal SIGKILL" in out
    assert "error: process 0 of 2 " in out
    assert "stopped sending heartbeats" in out and "\n1\n" in out.replace("[0] ", ""), out[-3000:]


@pytest.mark.parametrize("kind, eval_source", [("dpo", None), ("sft", "eval.jsonl")])
def test_tasks_not_yet_multi_process_are_refused(monkeypatch, kind, eval_source):
    import jax

    from qwen_jax.train import setup

    task = type("Task", (), {"kind": kind, "eval_source": eval_source})()
    setup._check_processes(task)  # one process: fine
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with pytest.raises(ValueError, match="does not run on several processes yet"):
        setup._check_processes(task)
