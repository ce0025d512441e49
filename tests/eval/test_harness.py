"""`python -m qwen_jax.eval --model qwen_jax` against lm-eval's own Hugging Face backend
(`lm_eval --model hf`, transformers on torch) on the same model, tasks and requests: per-request
log-likelihoods, greedy flags, greedy generations and task metrics."""

import glob
import json
import os
import subprocess
import sys

import jax
import pytest
import tokenizers
import torch
import transformers
import yaml
from flax import nnx

import readme_commands as readme
import train_runs
from qwen_jax.checkpoint import model_io
from qwen_jax.convert import hf
from qwen_jax.data import demo_corpus
from qwen_jax.data.train_tokenizer import DEMO_TOKENIZER_PATH
from qwen_jax.eval import demo_tasks
from qwen_jax.model.transformer import Qwen2ForCausalLM

LIMIT = 12
# The demo tasks, and continuations transformers decodes greedily, so that `is_greedy` is true
# for some requests (on a random model it never is for the demo's answers).
GREEDY_TASK = "qwen_check_greedy"
TASKS = ("qwen_demo_facts", "qwen_demo_arithmetic", "qwen_demo_text", GREEDY_TASK)
# Offline, with the datasets cache inside the test's directory.
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def _env(work, **extra) -> dict:
    return readme.env(HF_HOME=str(work / "hf_home"), **OFFLINE, **extra)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A qwen_jax checkpoint of a random tiny model with the demo tokenizer, its float32 export,
    and the demo tasks. The weights are scaled by 4: at the initial scale greedy decoding repeats
    one token, which would make identical generations a weak check."""
    work = tmp_path_factory.mktemp("lm_eval")
    # A short context, so that the rolling log-likelihood of a document takes several windows.
    config = train_runs.tiny_config(max_position_embeddings=64)
    model = Qwen2ForCausalLM(config, rngs=nnx.Rngs(0))
    nnx.update(model, jax.tree.map(lambda x: 4 * x, nnx.state(model, nnx.Param)))
    model_io.save_model_checkpoint(
        work / "ckpt",
        model_io.model_params(model),
        config,
        tokenizer_from=os.path.dirname(DEMO_TOKENIZER_PATH),
    )
    hf.save_model(model, work / "hf", dtype="float32", tokenizer_dir=work / "ckpt" / "tokenizer")
    readme.run(readme.command("python -m qwen_jax.eval.demo_tasks"), work)
    _write_greedy_task(work / "hf", work / "tasks")
    return work


def _write_greedy_task(model_dir, tasks_dir):
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    docs = []
    for doc in demo_tasks.fact_docs()[:LIMIT]:
        context = f"Q: {doc['question']}\nA:"
        ids = tokenizer(context, return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=3, do_sample=False)
        docs.append({"context": context, "continuation": tokenizer.decode(out[0, ids.shape[1] :])})
    demo_corpus.write_jsonl(tasks_dir / f"{GREEDY_TASK}.jsonl", docs)
    config = {
        "task": GREEDY_TASK,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(tasks_dir / f"{GREEDY_TASK}.jsonl")}},
        "test_split": "test",
        "output_type": "loglikelihood",
        "doc_to_text": "{{context}}",
        "doc_to_target": "{{continuation}}",
        "metric_list": [{"metric": "perplexity"}, {"metric": "acc"}],
    }
    (tasks_dir / f"{GREEDY_TASK}.yaml").write_text(yaml.safe_dump(config))


@pytest.fixture(scope="module")
def runs(work):
    """Both backends on every demo task: qwen_jax from the checkpoint on a 4-device mesh, hf
    from the export; lm-eval's result and sample files of each."""
    qwen = subprocess.Popen(
        [
            *readme.split(readme.command("python -m qwen_jax.eval --model qwen_jax"))[0],
            "--model_args=pretrained=ckpt,dtype=float32",
            f"--tasks=qwen_demo,{GREEDY_TASK}",
            f"--limit={LIMIT}",
            "--batch_size=4",
            "--output_path=out/qwen_jax",
        ],
        cwd=work,
        env=_env(work, XLA_FLAGS="--xla_force_host_platform_device_count=4"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    hf_run = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "hf"]
        + ["--model_args", "pretrained=hf,dtype=float32", "--device", "cpu"]
        + ["--tasks", f"qwen_demo,{GREEDY_TASK}", "--include_path", "tasks", "--limit", str(LIMIT)]
        + ["--batch_size", "4", "--log_samples", "--output_path", "out/hf"],
        cwd=work,
        env=_env(work),
        capture_output=True,
        text=True,
        timeout=900,
    )
    qwen_log = qwen.communicate(timeout=900)[0]
    assert qwen.returncode == 0, qwen_log[-5000:]
    assert hf_run.returncode == 0, hf_run.stderr[-5000:]
    return {name: _read(work / "out" / name) for name in ("qwen_jax", "hf")} | {"log": qwen_log}


def _read(directory) -> dict:
    (results,) = glob.glob(str(directory / "*" / "results_*.json"))
    samples = {}
    for task in TASKS:
        (path,) = glob.glob(str(directory / "*" / f"samples_{task}_*.jsonl"))
        with open(path) as f:
            samples[task] = sorted((json.loads(line) for line in f), key=lambda s: s["doc_id"])
    with open(results) as f:
        return {"results": json.load(f)["results"], "samples": samples}


def _responses(samples):
    for sample in samples:
        for response in sample["resps"]:
            yield sample["doc_id"], response[0]


@pytest.mark.parametrize("task", ["qwen_demo_facts", "qwen_demo_text", GREEDY_TASK])
def test_log_likelihoods_and_greedy_flags_equal_the_hf_backend(runs, task):
    ours = list(_responses(runs["qwen_jax"]["samples"][task]))
    theirs = list(_responses(runs["hf"]["samples"][task]))
    assert len(ours) == len(theirs) >= LIMIT
    for (doc, a), (doc_hf, b) in zip(ours, theirs):
        assert doc == doc_hf
        if task != "qwen_demo_text":  # [log-prob, is greedy]
            assert abs(float(a[0]) - float(b[0])) < 1e-4, (doc, a, b)
            assert a[1] == b[1], (doc, a, b)
        else:  # the rolling log-likelihood of a whole document
            assert abs(float(a) - float(b)) < 1e-4, (doc, a, b)
    if task == GREEDY_TASK:
        # Both flag values occur (a decoded continuation does not always re-encode to the
        # tokens generated, so not all are greedy).
        assert {a[1] for _, a in ours} == {"True", "False"}, ours


def test_greedy_generations_equal_the_hf_backend(runs):
    ours = [r for _, r in _responses(runs["qwen_jax"]["samples"]["qwen_demo_arithmetic"])]
    theirs = [r for _, r in _responses(runs["hf"]["samples"]["qwen_demo_arithmetic"])]
    assert ours == theirs
    assert len(set(ours)) > LIMIT // 2, ours  # varied text, not one repeated token


def test_task_metrics_equal_the_hf_backend(runs):
    ours, theirs = runs["qwen_jax"]["results"], runs["hf"]["results"]
    assert sorted(ours) == sorted(theirs) == sorted(TASKS)
    for task in TASKS:
        metrics = {k: v for k, v in theirs[task].items() if isinstance(v, float)}
        assert metrics, theirs[task]
        for key, value in metrics.items():
            if "perplexity" in key or "bits_per_byte" in key:  # from log-likelihoods within 1e-4
                assert ours[task][key] == pytest.approx(value, rel=1e-5), (task, key)
            else:
                assert ours[task][key] == value, (task, key)


def test_progress_bar_with_eta(runs):
    assert "loglikelihood requests: 100%" in runs["log"]
    assert "<00:00" in runs["log"]  # tqdm's elapsed<remaining


def _fails(work, *args):
    return subprocess.Popen(
        [sys.executable, "-m", "qwen_jax.eval", "--model", "qwen_jax", "--include_path", "tasks"]
        + list(args),
        cwd=work,
        env=_env(work),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_bad_input_is_one_line(work):
    other = tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0}, unk_token="a"))
    other.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    other.add_tokens([f"word{i}" for i in range(1000)])
    (work / "other_tokenizer").mkdir(exist_ok=True)
    other.save(str(work / "other_tokenizer" / "tokenizer.json"))
    cases = {
        "unknown task": (
            ["--model_args=pretrained=ckpt", "--tasks=qwen_demo_nope"],
            "error: Tasks not found: qwen_demo_nope",
        ),
        "missing checkpoint": (
            ["--model_args=pretrained=no/such/dir", "--tasks=qwen_demo_facts"],
            "error: pretrained=no/such/dir: no such directory",
        ),
        "tokenizer of another model": (
            ["--model_args=pretrained=hf,tokenizer=other_tokenizer", "--tasks=qwen_demo_facts"],
            "does not belong to the model: it has 1004 ids, the model's vocabulary 640",
        ),
    }
    procs = {name: _fails(work, *args) for name, (args, _) in cases.items()}
    for name, proc in procs.items():
        _, stderr = proc.communicate(timeout=300)
        errors = [line for line in stderr.splitlines() if line.startswith("error:")]
        assert proc.returncode == 1, (name, stderr[-3000:])
        assert len(errors) == 1 and cases[name][1] in errors[0], (name, stderr[-3000:])
        assert "Traceback" not in stderr, name
