"""Helpers for tests that run the real entry point in a subprocess on a tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import orbax.checkpoint as ocp

from qwen_jax.data import demo_corpus
from qwen_jax.data.train_tokenizer import DEMO_TOKENIZER_PATH

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# A 2-layer model on the demo corpus, two stages (the second with longer rows and a new RoPE
# theta), logging every step.
TINY_PRETRAIN = [
    f"setup.RunConfig.tokenizer_path = '{DEMO_TOKENIZER_PATH}'",
    "config.QwenConfig.hidden_size = 32",
    "config.QwenConfig.intermediate_size = 64",
    "config.QwenConfig.num_hidden_layers = 2",
    "stage1/config.DataStage.seq_len = 32",
    "stage1/config.DataStage.batch_size = 4",
    "stage2/config.DataStage.seq_len = 64",
    "stage2/config.DataStage.batch_size = 2",
    "STAGE1_STEPS = 20",
    "STAGE2_STEPS = 20",
    "optimizer.warmup_stable_decay.warmup_steps = 5",
    "optimizer.warmup_stable_decay.stable_steps = 15",
    "DECAY_STEPS = 20",
    "setup.RunConfig.log_every = 1",
    "tasks.PretrainTask.eval_source = None",
]


PRETRAIN_GIN = ["configs/demo/pretrain.gin"]
EVERY_7 = ["manager.CheckpointConfig.every_steps = 7"]


def tiny_pretrain(data: dict[str, str], *extra: str) -> list[str]:
    """The bindings of the tiny two-stage run on `data`, checkpoints every 7 steps."""
    return TINY_PRETRAIN + data_params(data) + EVERY_7 + list(extra)


def assert_same_run(workdir, reference, last_step: int = 40) -> None:
    """The loss at every step and every final parameter equal the reference run's, bit for bit."""
    ours, theirs = train_records(workdir), train_records(reference)
    assert sorted(ours) == sorted(theirs) == list(range(1, last_step + 1))
    for step in ours:
        assert ours[step]["loss"] == theirs[step]["loss"], step
        assert ours[step]["label"] == theirs[step]["label"], step
    a, b = flat(load_params(workdir, last_step)), flat(load_params(reference, last_step))
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def wait_for_step(workdir, proc, step: int, timeout: float = 300) -> None:
    """Returns once the run in `workdir` has logged `step` (it logs every step)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"exited early: {proc.returncode}\n{proc.stderr.read()[-3000:]}")
        if max(train_records(workdir), default=0) >= step:
            return
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout}s")


def tiny_config(**changes):
    """A 2-layer architecture over the demo vocabulary."""
    from qwen_jax.model.config import QwenConfig

    return QwenConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=640,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        bos_token_id=545,
        eos_token_id=545,
    ).replace(**changes)


def save_tiny_checkpoint(directory, seed: int = 0) -> None:
    """A random `tiny_config` model, as a model checkpoint (for `init_from`)."""
    from flax import nnx

    from qwen_jax.checkpoint import model_io
    from qwen_jax.model.transformer import Qwen2ForCausalLM

    config = tiny_config()
    model = Qwen2ForCausalLM(config, rngs=nnx.Rngs(seed))
    model_io.save_model_checkpoint(directory, model_io.model_params(model), config)


def write_data(directory) -> dict[str, str]:
    return demo_corpus.write_demo_data(directory, seed=0, scale=0.05)


def data_params(paths: dict[str, str]) -> list[str]:
    return [
        f"PRETRAIN_TEXT = '{paths['pretrain.jsonl']}'",
        f"LONG_TEXT = '{paths['long_docs.jsonl']}'",
        f"PRETRAIN_EVAL_TEXT = '{paths['pretrain_eval.jsonl']}'",
    ]


def command(workdir, gin_files, params) -> list[str]:
    return (
        [sys.executable, "-m", "qwen_jax.train", f"--workdir={workdir}"]
        + [f"--gin_file={f}" for f in gin_files]
        + [f"--gin_param={p}" for p in params]
    )


def env() -> dict:
    e = dict(os.environ)
    e["JAX_PLATFORMS"] = "cpu"
    e["XLA_FLAGS"] = ""  # one CPU device unless a test asks for more
    # Compiling the step takes most of a tiny run; runs with the same shapes share executables.
    e["JAX_COMPILATION_CACHE_DIR"] = os.path.join(tempfile.gettempdir(), "qwen_jax_test_jit_cache")
    e["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    return e


def run(workdir, gin_files, params, *, extra_env=None, check=True, timeout=600):
    result = subprocess.run(
        command(workdir, gin_files, params),
        cwd=REPO_ROOT,
        env={**env(), **(extra_env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and result.returncode:
        raise AssertionError(f"exit {result.returncode}\n{result.stderr[-5000:]}")
    return result


def start(workdir, gin_files, params, *, extra_env=None, log=None) -> subprocess.Popen:
    """The run in the background; its log goes to the open file `log` (a pipe nobody reads
    would stall a long run once full), else to a pipe."""
    return subprocess.Popen(
        command(workdir, gin_files, params),
        cwd=REPO_ROOT,
        env={**env(), **(extra_env or {})},
        stdout=subprocess.DEVNULL,
        stderr=log or subprocess.PIPE,
        text=True,
    )


def train_records(workdir, split: str = "train") -> dict[int, dict]:
    """The last record logged for each step (a resumed run logs some steps twice)."""
    path = os.path.join(workdir, "metrics.jsonl")
    records = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                record = json.loads(line)
                if record["split"] == split:
                    records[record["step"]] = record
    return records


def checkpoint_steps(workdir) -> list[int]:
    directory = os.path.join(workdir, "checkpoints")
    return sorted(int(d) for d in os.listdir(directory) if d.isdigit())


def load_params(workdir, step: int) -> dict:
    path = os.path.join(workdir, "checkpoints", str(step), "params")
    return ocp.StandardCheckpointer().restore(path)


def flat(tree) -> dict[str, np.ndarray]:
    import jax

    return {
        jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)
    }
