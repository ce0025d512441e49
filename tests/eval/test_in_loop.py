"""lm-eval tasks inside training (`configs/lm_eval.gin`), through `python -m qwen_jax.train`: the
metrics at the configured steps, lm-eval's results files, and the same figures as
`python -m qwen_jax.eval` gives on the checkpoint of that step."""

import glob
import json
import subprocess
import sys

import pytest
import train_runs

from qwen_jax.checkpoint import model_io
from qwen_jax.eval import demo_tasks, in_loop

TASKS = ["qwen_demo_facts", "qwen_demo_text"]
LIMIT = 6
SHORT_RUN = [  # two steps per stage
    "STAGE1_STEPS = 2",
    "STAGE2_STEPS = 2",
    "optimizer.warmup_stable_decay.warmup_steps = 1",
    "optimizer.warmup_stable_decay.stable_steps = 1",
    "DECAY_STEPS = 2",
]


@pytest.fixture(scope="module")
def run(tiny_pretrain_data, tmp_path_factory):
    work = tmp_path_factory.mktemp("lm_eval_in_loop")
    demo_tasks.write(work / "tasks")
    offline = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(work / "hf")}
    train_runs.run(
        work / "run",
        train_runs.PRETRAIN_GIN + ["configs/lm_eval.gin"],
        train_runs.tiny_pretrain(tiny_pretrain_data, *SHORT_RUN)
        + [
            f"LM_EVAL_TASKS = {TASKS}",
            "LM_EVAL_EVERY = 2",
            f"LM_EVAL_INCLUDE = '{work / 'tasks'}'",
            f"LM_EVAL_LIMIT = {LIMIT}",
        ],
        extra_env=offline,
    )
    cli = subprocess.run(
        [sys.executable, "-m", "qwen_jax.eval", "--model", "qwen_jax"]
        + ["--model_args", f"pretrained={work / 'run' / 'checkpoints' / '4'}"]
        + ["--tasks", ",".join(TASKS), "--include_path", str(work / "tasks")]
        + ["--limit", str(LIMIT), "--output_path", str(work / "cli")],
        cwd=work,
        env={**train_runs.env(), **offline},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert cli.returncode == 0, cli.stderr[-5000:]
    return work


def test_metrics_at_the_configured_steps(run):
    records = train_runs.train_records(run / "run", split="lm_eval")
    assert sorted(records) == [2, 4]
    for step, record in records.items():
        assert 0.0 <= record["qwen_demo_facts/acc"] <= 1.0, record
        assert record["qwen_demo_text/word_perplexity"] > 1.0, record
        with open(run / "run" / in_loop.RESULTS_DIR / f"results_step_{step}.json") as f:
            results = json.load(f)
        assert sorted(results["results"]) == TASKS  # lm-eval's own format
        assert results["config"]["limit"] == LIMIT
    # Two steps of training lower the held-out text's perplexity.
    assert (
        records[4]["qwen_demo_text/word_perplexity"] < records[2]["qwen_demo_text/word_perplexity"]
    )


def test_the_step_checkpoint_gives_the_same_figures_through_the_command_line(run):
    """The long-context stage's checkpoint carries that stage's RoPE base, so the command line
    evaluates the model the loop evaluated."""
    assert model_io.read_model_config(run / "run" / "checkpoints" / "4").rope_theta == 1e6
    in_training = train_runs.train_records(run / "run", split="lm_eval")[4]
    (path,) = glob.glob(str(run / "cli" / "*" / "results_*.json"))
    with open(path) as f:
        cli = in_loop.scalars(json.load(f))
    assert set(cli) == {k for k in in_training if k not in ("step", "split", "label")}
    for key, value in cli.items():
        assert in_training[key] == pytest.approx(value, rel=1e-5), key
