"""Every shell command in README.md runs in a test, as written plus step and size overrides, so
the README cannot drift from the code. The fine-tuning commands run in test_finetune_flow.py, the
demo in test_demo.py; the install and test commands are what .ci/run runs."""

import glob
import json
import os
import re
import shutil

import pytest

import readme_commands as readme
from qwen_jax.data import demo_corpus
from qwen_jax.data.train_tokenizer import DEMO_TOKENIZER_PATH

TESTS = os.path.dirname(os.path.abspath(__file__))
# Run by .ci/run itself (in a fresh virtual environment): the install and the test command.
CI_RUN = (
    "python3 -m venv .venv && . .venv/bin/activate",
    "pip install -e '.[test,tpu,seqio,eval]'",
    "python -m pytest -q tests",
)


def test_every_readme_command_is_run_by_a_test():
    used = set()
    for path in glob.glob(os.path.join(TESTS, "**", "*.py"), recursive=True):
        with open(path, encoding="utf-8") as f:
            used.update(re.findall(r'readme\.command\(\s*"([^"]+)"', f.read()))
    commands = readme.commands()
    assert len(commands) >= 12
    unrun = [c for c in commands if c not in CI_RUN and not any(c.startswith(u) for u in used)]
    assert not unrun, unrun


def test_ci_runs_the_readme_install_and_test_commands():
    with open(os.path.join(readme.REPO_ROOT, ".ci", "run"), encoding="utf-8") as f:
        ci = f.read()
    commands = readme.commands()
    for command in CI_RUN:
        assert command in commands, command
    assert "pip install --quiet -e '.[test,tpu,seqio,eval]'" in ci
    assert "\npython -m pytest -q tests\n" in ci


def test_model_info():
    result = readme.run(readme.command("python -m qwen_jax.model_info"), readme.REPO_ROOT)
    assert json.loads(result.stdout)["parameters"] == 72_706_203_648


def test_aot_compile_for_a_tpu_slice():
    pytest.importorskip("libtpu")
    result = readme.run(
        readme.command("python -m qwen_jax.aot"),
        readme.REPO_ROOT,
        "--gin_file=configs/models/qwen2_5_0_5b.gin",
        "--gin_param=config.QwenConfig.num_hidden_layers=2",
        "--gin_param=Runtime.attention_impl='pallas'",
        "--topology=v5e-8",
        "--seq_len=512",
        "--global_batch=8",
    )
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["num_devices"] == 8 and report["fits"]
    assert report["attention_impl"] == "pallas" and report["mosaic_kernels"] >= 3


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    """A working directory with `corpus/<source>/*.jsonl` and `tokenizer/tokenizer.json`."""
    work = tmp_path_factory.mktemp("readme")
    docs = demo_corpus.demo_records("pretrain.jsonl", scale=0.02)
    for name in ("web", "code", "math", "books", "instruct", "long"):
        (work / "corpus" / name).mkdir(parents=True)
        demo_corpus.write_jsonl(work / "corpus" / name / "part-0.jsonl", docs)
    (work / "tokenizer").mkdir()
    return work


def test_prepare(corpus_dir):
    shutil.copy(DEMO_TOKENIZER_PATH, corpus_dir / "tokenizer" / "tokenizer.json")
    readme.run(readme.command("python -m qwen_jax.data.prepare"), corpus_dir, "--workers=1")
    metadata = json.loads((corpus_dir / "corpus" / "web_tok" / "metadata.json").read_text())
    assert metadata["documents"] == 60


def test_bench_data():
    result = readme.run(
        readme.command("python -m qwen_jax.bench.data"),
        readme.REPO_ROOT,
        "--docs=100",
        "--seq_len=256",
        f"--tokenizer={DEMO_TOKENIZER_PATH}",
    )
    assert json.loads(result.stdout.strip().splitlines()[-1])["pipeline_tokens_per_s"] > 0


def test_bench_step():
    result = readme.run(
        readme.command("python -m qwen_jax.bench.step --gin_file"),
        readme.REPO_ROOT,
        "--gin_file=configs/demo/model.gin",
        "--seq_len=64",
        "--batch=2",
        "--steps=2",
        "--profile_steps=1",
    )
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["tokens_per_s"] > 0
    # The per-op profile: matmuls are among the ops, and no op takes longer than all together.
    profile = figures["profile"]
    assert any("dot" in name or "ynn" in name for name, _, _ in profile["top_ops"]), profile
    assert (
        0 < max(seconds for _, seconds, _ in profile["top_ops"]) <= profile["op_seconds_per_call"]
    )


@pytest.mark.parametrize("weights", ["float32", "bfloat16"])
def test_bench_decode_beside_transformers(weights):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    result = readme.run(
        readme.command("python -m qwen_jax.bench.decode"),
        readme.REPO_ROOT,
        "--gin_file=configs/demo/model.gin",
        f"--gin_param=layers.Runtime.param_dtype='{weights}'",
        f"--gin_param=layers.Runtime.dtype='{weights}'",
        "--prompt_len=8",
        "--new_tokens=4",
        "--repeats=1",
    )
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["param_dtype"] == summary["dtype"] == summary["peer_param_dtype"] == weights
    assert summary["peer_autocast"] is False
    assert min(summary["qwen_jax_tokens_per_s"], summary["peer_tokens_per_s"]) > 0
    assert summary["ratio"] == pytest.approx(
        summary["qwen_jax_tokens_per_s"] / summary["peer_tokens_per_s"], rel=1e-2
    )
    if weights == "float32":
        # Greedy decoding of the same fp32 weights: the same tokens in every row (in bf16 two
        # logits within rounding of each other can part the rows).
        assert summary["rows_with_the_same_tokens"] == summary["batch"] == 4


def test_bench_step_beside_torch():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    result = readme.run(
        readme.command("python -m qwen_jax.bench.step --peer=torch"),
        readme.REPO_ROOT,
        "--gin_file=configs/demo/model.gin",
        "--seq_len=32",
        "--batch=2",
        "--steps=2",
        "--repeats=1",
    )
    lines = [json.loads(line) for line in result.stdout.strip().splitlines()]
    assert [line.get("side") for line in lines[:2]] == ["qwen_jax", "torch"]
    summary = lines[-1]
    for side in ("qwen_jax", "peer"):
        figures = summary[side]
        assert figures["tokens_per_s"] > 0
        assert min(figures[p] for p in ("forward_s", "backward_s")) > 0, figures
    assert summary["tokens_per_s_ratio"] == pytest.approx(
        summary["qwen_jax"]["tokens_per_s"] / summary["peer"]["tokens_per_s"], rel=1e-2
    )


def test_bench_attention():
    result = readme.run(
        readme.command("python -m qwen_jax.bench.attention"),
        readme.REPO_ROOT,
        "--seq_lens=128",
        "--tokens=256",
        "--heads=4:2",
        "--head_dim=64",
        "--impls=xla,cudnn",
        "--reps=1",
        "--torch=false",
    )
    figures = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [(f["impl"], f["layout"]) for f in figures] == [
        ("xla", "causal"), ("cudnn", "causal"), ("xla", "packed"), ("cudnn", "packed"),
    ]  # fmt: skip
    xla = figures[0]
    assert xla["rows"] == 2 and xla["forward_tflops"] >= 0 and xla["forward_backward_ms"] > 0
    # On a CPU, cuDNN's row says why it did not run instead of stopping the table.
    assert "NVIDIA GPUs" in figures[1]["error"]
    assert "| 128 | 4:2 | causal | xla |" in result.stdout


def test_bench_grpo_step():
    result = readme.run(
        readme.command("python -m qwen_jax.bench.step --grpo_new_tokens"),
        readme.REPO_ROOT,
        "--grpo_new_tokens=8",
        "--gin_file=configs/demo/model.gin",
        "--seq_len=32",
        "--batch=8",
        "--steps=2",
        "--grpo_generations=4",
    )
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["generated_tokens_per_s"] > 0 and 0 < figures["generate_share"] < 1


def test_pretrain_in_stages(corpus_dir, qwen_tokenizer_path, tmp_path):
    """The staged recipe with a 7B preset shrunk to 2 layers of width 32, 2 steps a stage."""
    shutil.copy(qwen_tokenizer_path, corpus_dir / "tokenizer" / "tokenizer.json")
    sizes = [
        "hidden_size=32",
        "intermediate_size=64",
        "num_hidden_layers=2",
        "num_attention_heads=4",
        "num_key_value_heads=2",
    ]
    stages = [
        f"{s}/config.DataStage.{field}={value}"
        for s in ("stage1_4k", "stage2_32k", "anneal")
        for field, value in (("seq_len", 64), ("batch_size", 2))
    ]
    workdir = tmp_path / "run"
    readme.run(
        readme.command("python -m qwen_jax.train --gin_file=configs/models/qwen2_5_7b.gin"),
        corpus_dir,
        *[f"--gin_param=config.QwenConfig.{s}" for s in sizes],
        *[f"--gin_param={s}" for s in stages],
        "--gin_param=STAGE1_STEPS=2",
        "--gin_param=STAGE2_STEPS=2",
        "--gin_param=ANNEAL_STEPS=2",
        "--gin_param=WARMUP_STEPS=1",
        "--gin_param=STABLE_STEPS=3",
        "--gin_param=setup.RunConfig.log_every=1",
        f"--workdir={workdir}",
    )
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    labels = [r["label"] for r in records if r["split"] == "train"]
    assert labels == ["stage=stage1_4k"] * 2 + ["stage=stage2_32k"] * 2 + ["stage=anneal"] * 2
    assert sorted(os.listdir(workdir / "checkpoints")) == ["6"]
