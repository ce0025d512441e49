"""The commands behind the attention figures in docs/results.md run and measure what they say."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from qwen_jax.cli import REPO_ROOT


def test_attention_blocks_counts_fewer_pairs_than_causal_on_packed_rows():
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "qwen_jax.bench.attention_blocks",
            "--seq_len=4096",
            "--mean_doc_tokens=256",
            "--rows=2",
        ],  # fmt: skip
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rows = re.findall(r"\| (\w+) \| 256 \| (\d+) \(.*\) \| (\d+) \| (\d+) \|", result.stdout)
    assert len(rows) == 2, result.stdout
    for _, ours, causal, every in rows:
        # 8 x 8 blocks of 512: 36 causal pairs; documents of ~256 tokens leave about the diagonal.
        assert int(every) == 64 and int(causal) == 36
        assert 8 <= int(ours) < int(causal)


def test_attention_memory_of_pallas_is_below_xla_for_a_tpu_slice():
    pytest.importorskip("libtpu")
    import gin

    from qwen_jax import aot, configurables
    from qwen_jax.bench.attention_memory import attention_peak_bytes
    from qwen_jax.model.config import QwenConfig
    from qwen_jax.model.layers import Runtime
    from qwen_jax.parallel import mesh as mesh_lib

    gin.clear_config()
    try:
        gin.parse_config_file(f"{REPO_ROOT}/configs/mesh/rules.gin")
        rules = configurables.logical_rules()
    finally:
        gin.clear_config()
    # 0.5B's attention shapes: 14 query heads over 2 KV heads of 64.
    config = QwenConfig(
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=1,
        num_attention_heads=14,
        num_key_value_heads=2,
    )
    mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(fsdp=8), aot.topology_devices("v5e-8"))
    peaks = {
        impl: attention_peak_bytes(
            config, Runtime(dtype="bfloat16", attention_impl=impl), mesh, rules, 8, 2048
        )
        for impl in ("xla", "pallas")
    }
    # XLA keeps [heads, 2048, 2048] float32 scores per example; ours O(length) per head.
    scores = 14 * 2048 * 2048 * 4
    assert peaks["xla"] >= scores, peaks
    assert peaks["pallas"] < scores / 4, peaks
