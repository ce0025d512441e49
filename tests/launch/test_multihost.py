"""Two processes x 4 emulated CPU devices, joined by `qwen_jax.launch.local`, train as one
8-device process does: the same losses, a kill -9 resumed with every process's data position,
a checkpoint that restores in one 4-device process, an export equal to a single-process one; and
a killed peer ends the other process instead of leaving it blocked; DPO's reference pass and
evaluation, split over two processes, give what one process gives, and so does GRPO."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from flax import nnx
import safetensors.numpy

import train_runs
from qwen_jax.checkpoint import model_io
from qwen_jax.data.train_tokenizer import DEMO_TOKENIZER_PATH
from qwen_jax.model.transformer import build_model
from qwen_jax.train import reference

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
# TRL's DPO metrics, but not rewards/accuracies: it counts margins > 0, and while the policy is
# still the reference its margins are float noise around 0 that either run may round across.
DPO_METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen",
               "logps/rejected")  # fmt: skip
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


def _dpo_params(root) -> list[str]:
    """The demo's DPO with its reference precomputed, on a (fsdp=4) mesh, the train pairs in two
    files of 28 and 22 pairs: one data shard each, 4 pairs a step, so shard 1 runs out after 6
    steps (the last one padded) while shard 0 still has data: the run ends there, in every
    process."""
    data = train_runs.write_data(root / "data")
    with open(data["preference_train.jsonl"]) as f:
        pairs = f.readlines()
    assert len(pairs) == 50
    for name, part in (("a", pairs[:28]), ("b", pairs[28:])):
        (root / f"pairs_{name}.jsonl").write_text("".join(part))
    train_runs.save_tiny_checkpoint(root / "init", seed=1)
    return [
        f"setup.RunConfig.tokenizer_path = '{DEMO_TOKENIZER_PATH}'",
        f"PREFERENCE_TRAIN = '{root / 'pairs_*.jsonl'}'",
        f"PREFERENCE_EVAL = '{data['preference_eval.jsonl']}'",
        f"INIT_FROM = '{root / 'init'}'",
        "tasks.DPOTask.batch_size = 8",
        "tasks.DPOTask.eval_batch_size = 8",
        "tasks.DPOTask.num_epochs = 1",
        "tasks.DPOTask.max_new_tokens = 4",
        "tasks.DPOTask.precompute_reference = True",
        "setup.RunConfig.data_shards = 2",
        "setup.RunConfig.log_every = 1",
        "mesh.MeshConfig.data = 1",
        "mesh.MeshConfig.fsdp = 4",
    ]


def test_dpo_with_precomputed_reference_and_evaluation_on_two_processes_as_on_one(tmp_path):
    params = _dpo_params(tmp_path)
    gin = ["configs/demo/dpo.gin"]
    one, two = tmp_path / "one_process", tmp_path / "two_processes"
    train_runs.run(one, gin, params, extra_env=_env(4))
    _finish(_launch(train_runs.command(two, gin, params)[3:], devices=2))

    table_one = reference.load_table(str(one / reference.TABLE_FILE))
    table_two = reference.load_table(str(two / reference.TABLE_FILE))
    assert sorted(table_two) == sorted(table_one) and len(table_one) == 55  # train and eval
    for loc, values in table_one.items():
        np.testing.assert_allclose(table_two[loc], values, rtol=0, atol=TOLERANCE, err_msg=loc)

    for split, steps in (("train", [1, 2, 3, 4, 5, 6]), ("eval", [0, 6])):
        want, got = train_runs.train_records(one, split), train_runs.train_records(two, split)
        assert sorted(want) == sorted(got) == steps, split
        for step in steps:
            keys = DPO_METRICS + (
                ("preference_accuracy", "greedy_chosen_rate") if split == "eval" else ()
            )
            for key in keys:
                assert abs(got[step][key] - want[step][key]) <= TOLERANCE, (split, step, key)
    # The run's record tallies add up both processes' shards: shard 1's 22 pairs and at least
    # the 24 that shard 0 fed to the 6 steps.
    (tally,) = train_runs.train_records(two, "data").values()
    assert tally["source0/records"] >= 22 + 24 and tally["source0/bad"] == 0, tally


def _answers(log: str) -> list[str]:
    """The greedy answers of the evaluations' samples, in order."""
    return [line.split("got: ", 1)[1] for line in log.splitlines() if "    got: " in line]


def test_sft_exact_match_on_two_processes_as_on_one(tmp_path):
    data = train_runs.write_data(tmp_path / "data")
    train_runs.save_tiny_checkpoint(tmp_path / "init", seed=2)
    params = [
        f"setup.RunConfig.tokenizer_path = '{DEMO_TOKENIZER_PATH}'",
        f"CHAT_TRAIN = '{data['chat_train.jsonl']}'",
        f"CHAT_EVAL = '{data['chat_eval.jsonl']}'",
        f"INIT_FROM = '{tmp_path / 'init'}'",
        "SFT_STEPS = 2",
        "optimizer.warmup_cosine.warmup_steps = 1",
        "tasks.SFTTask.seq_len = 128",
        "tasks.SFTTask.max_new_tokens = 6",
        "tasks.SFTTask.num_samples = 5",
        "setup.RunConfig.data_shards = 2",
        "mesh.MeshConfig.data = 1",
        "mesh.MeshConfig.fsdp = 4",
    ]
    gin = ["configs/demo/sft.gin"]
    one, two = tmp_path / "one_process", tmp_path / "two_processes"
    one_log = train_runs.run(one, gin, params, extra_env=_env(4)).stderr
    two_log = _finish(_launch(train_runs.command(two, gin, params)[3:], devices=2))

    want, got = train_runs.train_records(one, "eval"), train_runs.train_records(two, "eval")
    assert sorted(want) == sorted(got) == [0, 2]
    for step in want:
        for key in ("loss", "exact_match"):
            assert abs(got[step][key] - want[step][key]) <= TOLERANCE, (step, key)
    # The 5 held-out prompts' greedy answers at steps 0 and 2, word for word (this random
    # model's answers are whitespace, so this is the weaker half of the check).
    assert len(_answers(one_log)) == 10 and _answers(two_log) == _answers(one_log)


def test_grpo_on_two_processes_as_on_one(tmp_path):
    """The demo's GRPO (a frozen reference, two updates per generation batch, batch-scaled
    rewards, a reward model among the rewards), its prompts in two data shards, on an fsdp=4
    mesh: each process samples and scores its own prompts' groups, and the run logs and learns
    what one process does."""
    data = train_runs.write_data(tmp_path / "data")
    train_runs.save_tiny_checkpoint(tmp_path / "init", seed=1)
    reward_config = train_runs.tiny_config(num_labels=1)  # a random reward model
    classifier = build_model(reward_config, rngs=nnx.Rngs(2))
    model_io.save_model_checkpoint(
        tmp_path / "reward_model", model_io.model_params(classifier), reward_config
    )
    params = [
        "from qwen_jax.train import reward_model",
        f"reward_model.RewardModelScore.checkpoint = '{tmp_path / 'reward_model'}'",
        "reward_model.RewardModelScore.batch_size = 4",
        f"setup.RunConfig.tokenizer_path = '{DEMO_TOKENIZER_PATH}'",
        f"GRPO_PROMPTS = '{data['grpo_prompts.jsonl']}'",
        f"GRPO_EVAL = '{data['grpo_eval.jsonl']}'",
        f"INIT_FROM = '{tmp_path / 'init'}'",
        "GRPO_STEPS = 3",
        "grpo_task.GRPOTask.batch_size = 2",
        "grpo_task.GRPOTask.max_prompt_len = 40",
        "grpo_task.GRPOTask.max_new_tokens = 6",
        "grpo_task.GRPOTask.eval_examples = 6",
        "grpo_task.GRPOTask.reward_functions = "
        "[@rewards.ExactMatch(), @rewards.FormatMatch(), @reward_model.RewardModelScore()]",
        "rewards.FormatMatch.pattern = '.*[aeiou].*'",
        "grpo.GRPOConfig.num_generations = 4",
        "grpo.GRPOConfig.beta = 0.04",
        "grpo.GRPOConfig.num_iterations = 2",
        "grpo.GRPOConfig.scale_rewards = 'batch'",
        "optimizer.warmup_cosine.peak_lr = 1e-3",
        "optimizer.warmup_cosine.warmup_steps = 1",
        "setup.RunConfig.eval_at_start = False",
        "setup.RunConfig.log_every = 1",
        "setup.RunConfig.data_shards = 2",
        "mesh.MeshConfig.data = 1",
        "mesh.MeshConfig.fsdp = 4",
    ]
    gin = ["configs/demo/grpo.gin"]
    one, two = tmp_path / "one_process", tmp_path / "two_processes"
    train_runs.run(one, gin, params, extra_env=_env(4))
    _finish(_launch(train_runs.command(two, gin, params)[3:], devices=2))

    keys = ("loss", "reward", "reward_std", "kl", "rewards/exact_match/mean",
            "rewards/format/mean", "rewards/reward_model/mean", "completions/mean_length",
            "completions/clipped_ratio")  # fmt: skip
    want, got = train_runs.train_records(one), train_runs.train_records(two)
    assert sorted(want) == sorted(got) == [1, 2, 3]
    for step in want:
        for key in keys:
            assert abs(got[step][key] - want[step][key]) <= TOLERANCE, (step, key)
    assert any(want[step]["reward_std"] > 0 for step in want)  # advantages were not all 0
    evals_one, evals_two = (train_runs.train_records(w, "eval")[3] for w in (one, two))
    assert abs(evals_two["reward"] - evals_one["reward"]) <= TOLERANCE
    a, b = (
        train_runs.flat(model_io.load_model_checkpoint(w / "checkpoints" / "3")[1])
        for w in (one, two)
    )
    for name in a:
        np.testing.assert_allclose(b[name], a[name], rtol=0, atol=TOLERANCE, err_msg=name)
