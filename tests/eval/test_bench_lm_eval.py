"""`python -m qwen_jax.bench.lm_eval` runs both backends on the same requests and prints one JSON
line whose answers agree (the figures themselves are in docs/results.md)."""

import json
import subprocess
import sys

import train_runs


def test_bench_prints_both_rates_and_agreeing_answers(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "qwen_jax.bench.lm_eval", "--hidden_size=64", "--layers=1"]
        + ["--requests=16", "--batch_size=8", "--repeats=1"],
        cwd=tmp_path,
        env={**train_runs.env(), "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-5000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["requests"] == 16
    assert figures["qwen_jax_requests_per_s"] > 0 and figures["hf_requests_per_s"] > 0
    assert figures["max_abs_logprob_difference"] < 1e-4
