"""The real entry points end to end: a two-step smoke run, and the embedded demo (shortened)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "train"))
import train_runs as runs  # noqa: E402


def test_smoke_two_steps(tmp_path):
    data = runs.write_data(tmp_path / "data")
    params = runs.TINY_PRETRAIN + runs.data_params(data) + ["loop.train.total_steps = 2"]
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
    workdir = tmp_path_factory.mktemp("demo")
    result = subprocess.run(
        [sys.executable, "-m", "qwen_jax.train.demo", f"--workdir={workdir}",
         "--gin_file=configs/demo/ci.gin"],
        cwd=runs.REPO_ROOT, env=runs.env(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-5000:]
    return workdir, result.stdout


def test_demo_loss_falls_in_every_stage(demo):
    workdir, stdout = demo
    assert "SFT exact match" in stdout
    for run_dir, label in [("pretrain", "stage=stage1_short"), ("pretrain", "stage=stage2_long"),
                           ("sft", None), ("dpo", None)]:
        losses = _losses(workdir / run_dir, label)
        assert len(losses) >= 2, (run_dir, label)
        assert losses[-1] < losses[0], (run_dir, label, losses)
    results = json.loads((workdir / "demo_results.json").read_text())
    sft_before, sft_after = results["sft_eval_loss"]
    assert sft_after < sft_before


def test_demo_dpo_preference_accuracy_rises_above_0_8(demo):
    workdir, _ = demo
    results = json.loads((workdir / "demo_results.json").read_text())
    # On held-out pairs. TRL's rewards/accuracies compares with the reference: 0 at the start
    # by definition (every reward is 0 and a tie is no win).
    before, after = results["dpo_rewards_accuracies"]
    assert before == 0.0 and after > 0.8, (before, after)


def test_demo_export_loads_in_transformers_with_the_same_greedy_output(demo):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from qwen_jax.checkpoint import model_io
    from qwen_jax.data.tokenizer import Tokenizer
    from qwen_jax.model.generate import generate
    from qwen_jax.train.loop import DEMO_TOKENIZER

    workdir, _ = demo
    tokenizer = Tokenizer.from_file(DEMO_TOKENIZER)
    prompt = np.asarray([tokenizer.encode("The capital of")], np.int32)
    steps = runs.checkpoint_steps(workdir / "dpo")
    ours = model_io.load_model(workdir / "dpo" / "checkpoints" / str(steps[-1]))
    tokens, _ = generate(ours, prompt, np.ones_like(prompt), max_new_tokens=12,
                         stop_tokens=(10_000,))  # an id outside the vocab: never stops early
    hf = transformers.AutoModelForCausalLM.from_pretrained(workdir / "hf", dtype=torch.float32)
    out = hf.generate(torch.tensor(prompt), max_new_tokens=12, do_sample=False,
                      eos_token_id=None, pad_token_id=0)
    assert out[0, prompt.shape[1]:].tolist() == np.asarray(tokens)[0].tolist()
