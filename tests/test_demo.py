"""The real entry points end to end: a two-step smoke run, and the embedded demo (shortened)."""

import json
import os
import sys

import numpy as np
import pytest

import readme_commands as readme

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "train"))
import train_runs as runs  # noqa: E402


def test_smoke_two_steps(tmp_path):
    data = runs.write_data(tmp_path / "data")
    params = runs.TINY_PRETRAIN + runs.data_params(data) + ["setup.RunConfig.total_steps = 2"]
    runs.run(tmp_path / "run", ["configs/demo/pretrain.gin"], params)
    records = runs.train_records(tmp_path / "run")
    assert sorted(records) == [1, 2]
    assert all(np.isfinite(r["loss"]) for r in records.values())
    assert runs.checkpoint_steps(tmp_path / "run") == [2]
    assert os.listdir(tmp_path / "run" / "tensorboard")


def _losses(run_dir, label=None):
    records = runs.train_records(run_dir)
    return [r["loss"] for s, r in sorted(records.items()) if label is None or r["label"] == label]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The README's demo command as a user runs it; QWEN_JAX_DEMO_SEED runs it with another seed
    (the thresholds below hold for seeds 0, 1 and 2)."""
    workdir = tmp_path_factory.mktemp("demo")
    seed = os.environ.get("QWEN_JAX_DEMO_SEED", "0")
    result = readme.run(
        readme.command("JAX_PLATFORMS=cpu python -m qwen_jax.train.demo"),
        runs.REPO_ROOT,
        f"--workdir={workdir}",
        f"--seed={seed}",
    )
    return workdir, result.stdout


def test_demo_loss_falls_in_every_stage(demo):
    workdir, stdout = demo
    assert "SFT exact match" in stdout
    for run_dir, label in [
        ("pretrain", "stage=stage1_short"),
        ("pretrain", "stage=stage2_long"),
        ("sft", None),
        ("dpo", None),
    ]:
        losses = _losses(workdir / run_dir, label)
        assert len(losses) >= 2, (run_dir, label)
        assert losses[-1] < losses[0], (run_dir, label, losses)
    results = json.loads((workdir / "demo_results.json").read_text())
    sft_before, sft_after = results["sft_eval_loss"]
    assert sft_after < sft_before


def test_demo_filter_removes_the_planted_noise_and_nothing_else(demo):
    """The filter phase keeps every clean pre-training document, in order, and removes every
    planted noise document (each carries its kind), so pre-training sees the clean corpus."""
    workdir, stdout = demo
    data = workdir / "data"
    clean = [json.loads(line)["text"] for line in open(data / "pretrain.jsonl")]
    kept = [
        json.loads(line) for p in sorted(data.glob("filtered/part-*.jsonl")) for line in open(p)
    ]
    removed = [
        json.loads(line)
        for p in sorted(data.glob("filtered/removed/part-*.jsonl"))
        for line in open(p)
    ]
    assert [r["text"] for r in kept] == clean
    assert removed and all("noise" in r and r["reason"] for r in removed)
    planted = sum("noise" in json.loads(line) for line in open(data / "pretrain_raw.jsonl"))
    assert len(removed) == planted
    results = json.loads((workdir / "demo_results.json").read_text())
    assert results["filter"]["kept"] == len(clean)
    assert "filter:" in stdout


# The demo's held-out figures (docs/results.md, "The demo") on seeds 0, 1, 2, and again on the
# same seeds after a change that only reordered float sums (pre-training drifts apart after ~50
# steps, and every later stage starts from a different model), worst first:
#   SFT exact match 0.17 / 0.19 / 0.19 / 0.24 / 0.25 / 0.39; DPO preference accuracy after
#   0.91 to 1.00, from 0.45 or 0.49; rewards/accuracies 0.75 / 0.78 / 0.82 / 0.88 / 0.90 / 0.92.
# Each threshold sits well below the worst run, so another CPU's rounding cannot fail it. Greedy
# answer == chosen ranged from 0.00 to 0.33 over those six runs: it is recorded, not asserted.
def test_demo_figures_rise_on_held_out_data(demo):
    workdir, _ = demo
    results = json.loads((workdir / "demo_results.json").read_text())
    before, after = results["sft_exact_match"]
    assert before == 0.0 and after >= 0.1, (before, after)
    before, after = results["dpo_preference_accuracy"]
    assert after >= 0.8 and after - before >= 0.3, (before, after)
    before, after = results["dpo_greedy_chosen_rate"]
    assert before == 0.0 and 0.0 <= after <= 1.0, (before, after)
    # TRL's rewards/accuracies compares with the reference: 0 at the start by definition (every
    # reward is 0 and a tie is no win).
    before, after = results["dpo_rewards_accuracies"]
    assert before == 0.0 and after >= 0.6, (before, after)
    before, after = results["pretrain_eval_loss"]
    assert after < 0.25 * before, (before, after)


# The GRPO stage on seeds 0, 1, 2 (docs/results.md, "The demo"), before and after the change
# above: mean sampled reward of the first -> last five logged steps 0.598 -> 0.677,
# 0.786 -> 0.942, 0.384 -> 0.637, then 0.261 -> 0.302, 0.256 -> 0.309, 0.347 -> 0.542 (worst
# rise +0.04; a logged reward averages 128 samples of 16 of the 42 questions, so the rise is
# noisy); greedy exact match on the arithmetic questions it trains on 0.64 -> 0.81,
# 0.93 -> 0.98, 0.55 -> 0.69, then 0.24 -> 0.29, 0.26 -> 0.33, 0.36 -> 0.69 (worst +0.05).
# Held-out exact match (recorded, not asserted: the tiny model transfers little to questions it
# never trained on) 0.38 -> 0.49, 0.44 -> 0.50, 0.31 -> 0.25, then 0.00 -> 0.00, 0.11 -> 0.04,
# 0.13 -> 0.15.
def test_demo_grpo_learns_from_its_own_samples(demo):
    workdir, stdout = demo
    assert "GRPO exact match" in stdout
    rewards = [r["reward"] for r in _records(workdir / "grpo")]
    assert len(rewards) >= 10
    assert np.mean(rewards[-5:]) > np.mean(rewards[:5]), rewards
    results = json.loads((workdir / "demo_results.json").read_text())
    before, after = results["grpo_trained_questions"]
    assert after >= before, (before, after)
    assert all(0 <= x <= 1 for x in results["grpo_exact_match"])


def _records(run_dir):
    return [r for _, r in sorted(runs.train_records(run_dir).items())]


def test_demo_export_loads_in_transformers_with_the_same_greedy_output(demo):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from qwen_jax.checkpoint import model_io
    from qwen_jax.data.tokenizer import Tokenizer
    from qwen_jax.model.generate import generate
    from qwen_jax.data.train_tokenizer import DEMO_TOKENIZER_PATH as DEMO_TOKENIZER

    workdir, _ = demo
    tokenizer = Tokenizer.from_file(DEMO_TOKENIZER)
    prompt = np.asarray([tokenizer.encode("The capital of")], np.int32)
    steps = runs.checkpoint_steps(workdir / "grpo")
    ours = model_io.load_model(workdir / "grpo" / "checkpoints" / str(steps[-1]))
    tokens, _ = generate(
        ours, prompt, np.ones_like(prompt), max_new_tokens=12, stop_tokens=(10_000,)
    )  # an id outside the vocab: never stops early
    hf = transformers.AutoModelForCausalLM.from_pretrained(workdir / "hf", dtype=torch.float32)
    out = hf.generate(
        torch.tensor(prompt), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    assert out[0, prompt.shape[1] :].tolist() == np.asarray(tokens)[0].tolist()
