"""GRPO through the real CLI on a tiny model: exact resume after kill -9, the metrics it logs,
and bad input."""

import json
import signal
import time

import pytest

import train_runs as runs
from qwen_jax.data.train_tokenizer import DEMO_TOKENIZER_PATH

GIN = ["configs/demo/grpo.gin"]
STEPS = 12


# A user's own reward function, registered as the README says; the runs import it by name.
USER_REWARDS = """
import gin


def short(prompts, completions, completion_ids, **fields):
    return [1.0 if len(ids) < 4 else 0.0 for ids in completion_ids]


gin.external_configurable(short, module="user_rewards")
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Demo prompt data, a random tiny starting checkpoint, the user's reward module."""
    root = tmp_path_factory.mktemp("grpo")
    data = runs.write_data(root / "data")
    runs.save_tiny_checkpoint(root / "init")
    (root / "user_rewards.py").write_text(USER_REWARDS)
    return root, data


def _env(setup):
    return {"PYTHONPATH": str(setup[0])}


def _params(setup, **changes):
    """A tiny run exercising every stored part of the state: the frozen reference (beta > 0),
    old log-probs (two updates per generation batch), built-in and user reward functions,
    checkpoints every 3 steps. The format reward varies among random completions, so advantages
    are not all 0."""
    root, data = setup
    params = {
        "GRPO_PROMPTS": f"'{data['grpo_prompts.jsonl']}'",
        "GRPO_EVAL": f"'{data['grpo_eval.jsonl']}'",
        "INIT_FROM": f"'{root / 'init'}'",
        "setup.RunConfig.tokenizer_path": f"'{DEMO_TOKENIZER_PATH}'",
        "GRPO_STEPS": STEPS,
        "grpo_task.GRPOTask.batch_size": 2,
        "grpo_task.GRPOTask.max_prompt_len": 40,
        "grpo_task.GRPOTask.max_new_tokens": 6,
        "grpo_task.GRPOTask.reward_functions": (
            "[@rewards.ExactMatch(), @rewards.FormatMatch(), @user_rewards.short]"
        ),
        "grpo_task.GRPOTask.reward_weights": "[1.0, 0.5, 0.1]",
        "rewards.FormatMatch.pattern": r"'.*[aeiou].*'",
        "grpo.GRPOConfig.num_generations": 4,
        "grpo.GRPOConfig.beta": 0.04,
        "grpo.GRPOConfig.num_iterations": 2,
        "grpo.GRPOConfig.epsilon_high": 0.28,
        "optimizer.warmup_cosine.peak_lr": 1e-3,
        "optimizer.warmup_cosine.warmup_steps": 2,
        "setup.RunConfig.eval_at_start": False,
        "setup.RunConfig.log_every": 1,
        "setup.RunConfig.checkpoint": "@manager.CheckpointConfig()",
        "manager.CheckpointConfig.every_steps": 3,
        **changes,
    }
    imports = ["from qwen_jax.checkpoint import manager", "import user_rewards"]
    return imports + [f"{k} = {v}" for k, v in params.items()]


@pytest.fixture(scope="module")
def reference(setup):
    workdir = setup[0] / "reference"
    runs.run(workdir, GIN, _params(setup), extra_env=_env(setup))
    return workdir


def test_logs_trl_metrics_and_rollout_figures(reference):
    records = runs.train_records(reference)
    assert sorted(records) == list(range(1, STEPS + 1))
    for name in (
        "loss",
        "reward",
        "reward_std",
        "frac_reward_zero_std",
        "rewards/exact_match/mean",
        "rewards/format/mean",
        "rewards/format/std",
        "rewards/short/mean",
        "completions/mean_length",
        "completions/clipped_ratio",
        "kl",
        "entropy",
        "clip_ratio/low_mean",
        "clip_ratio/high_mean",
        "clip_ratio/region_mean",
        "rollout/tokens_per_s",
        "rollout/share_of_step",
    ):
        assert all(name in r for r in records.values()), name
    assert 0 < records[STEPS]["rollout/share_of_step"] < 1
    assert any(r["reward_std"] > 0 for r in records.values())  # something to learn from
    assert any(r["kl"] > 0 for r in records.values())  # the policy moved off the reference
    evals = runs.train_records(reference, split="eval")
    assert set(evals) == {STEPS}
    assert {"reward", "rewards/exact_match", "rewards/format", "rewards/short"} <= set(evals[STEPS])


def test_kill_9_then_resume_is_exact(setup, reference, tmp_path):
    params = _params(setup)
    proc = runs.start(tmp_path, GIN, params, extra_env=_env(setup))
    deadline = time.time() + 300
    # Killed as soon as a checkpoint is complete (they are written in the background).
    while not (tmp_path / "checkpoints").is_dir() or not runs.checkpoint_steps(tmp_path):
        assert proc.poll() is None and time.time() < deadline, "ended before its first save"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert 3 <= max(runs.checkpoint_steps(tmp_path)) < STEPS
    runs.run(tmp_path, GIN, params, extra_env=_env(setup))
    runs.assert_same_run(tmp_path, reference, last_step=STEPS)
    ours, theirs = runs.train_records(tmp_path), runs.train_records(reference)
    for step in ours:  # the same completions were sampled and scored
        for key in ("reward", "completions/mean_length", "kl", "clip_ratio/region_mean"):
            assert ours[step][key] == theirs[step][key], (step, key)


def _fails(workdir, params, match, setup):
    result = runs.run(workdir, GIN, params, check=False, extra_env=_env(setup))
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 1 and len(errors) == 1, result.stderr[-3000:]
    assert match in errors[0], errors[0]
    return errors[0]


def test_an_unregistered_reward_function_is_one_line(setup, tmp_path):
    params = _params(setup, **{"grpo_task.GRPOTask.reward_functions": "[@rewards.NoSuch()]"})
    line = _fails(tmp_path / "w", params, "rewards.NoSuch", setup)
    assert "gin.external_configurable" in line
    assert not (tmp_path / "w").exists()


def test_a_prompt_without_the_answer_field_is_one_line(setup, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "What is 1 + 1?", "solution": "2"}) + "\n")
    params = _params(setup, GRPO_PROMPTS=f"'{prompts}'")
    line = _fails(tmp_path / "w", params, f"{prompts}:1", setup)
    assert "no field 'answer', which reward function 'exact_match' reads" in line
    assert not (tmp_path / "w").exists()
