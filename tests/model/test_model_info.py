"""`python -m qwen_jax.model_info`: sizes of a preset without allocating it."""

import json
import os
import pathlib
import subprocess
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


def run(*args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, "-m", "qwen_jax.model_info", *args],
        cwd="/",
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_72b_preset_in_bfloat16():
    result = run(
        "--gin_file=configs/models/qwen2_5_72b.gin",
        "--gin_param=Runtime.dtype='bfloat16'",
        "--gin_param=Runtime.param_dtype='bfloat16'",
        "--seq_len=32768",
        "--tensors",
    )
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    # 72,706,203,648 is the sum of numel over transformers' Qwen2ForCausalLM for this config
    # (tests/model/test_presets.py checks the same figure against transformers).
    assert info["parameters"] == 72_706_203_648
    assert info["parameter_bytes"] == 2 * 72_706_203_648
    # K and V, 80 layers, 8 KV heads of 128 dims, 2 bytes each.
    assert info["kv_cache_bytes_per_token"] == 2 * 80 * 8 * 128 * 2
    assert info["kv_cache_bytes_per_sequence"] == 2 * 80 * 8 * 128 * 2 * 32768
    assert info["tensors"]["layers.self_attn.q_proj.kernel"] == {
        "shape": [80, 8192, 64, 128],
        "logical_axes": ["layers", "embed", "q_heads", "head_dim"],
    }
    assert info["config"]["num_hidden_layers"] == 80


def test_missing_preset_is_one_clear_line():
    result = run()
    assert result.returncode == 1
    # gin's "Required bindings for `QwenConfig` not provided", as the flags that set them.
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: QwenConfig.hidden_size, QwenConfig.intermediate_size,"), last
    assert "are required: set with --gin_param=QwenConfig.hidden_size=..." in last
    result = run("--gin_file=configs/models/qwen2_5_9b.gin")
    assert result.returncode == 1
    assert "--gin_file=configs/models/qwen2_5_9b.gin: not found" in result.stderr
