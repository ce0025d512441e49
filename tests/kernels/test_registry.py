"""Importing the model alone makes every registered attention implementation available, and each
one computes what the reference (`xla`) computes inside the model."""

import os
import subprocess
import sys

from qwen_jax.cli import REPO_ROOT

# A fresh interpreter that imports only the model: no gin file, entry point or kernel module.
PROGRAM = """
import jax, numpy as np
from flax import nnx
from qwen_jax.model.config import QwenConfig
from qwen_jax.model.layers import Runtime
from qwen_jax.model.transformer import Qwen2ForCausalLM
from qwen_jax.kernels import registry

config = QwenConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
ids = np.arange(24, dtype=np.int32).reshape(2, 12) % 64
segments = np.array([[1] * 7 + [2] * 5, [1] * 9 + [0] * 3], np.int32)
positions = np.array([list(range(7)) + list(range(5)), list(range(9)) + [0] * 3], np.int32)
logits = {}
# cuDNN runs on NVIDIA GPUs only (tests/kernels/test_flash_gpu.py checks it there).
for name in sorted(set(registry.IMPLEMENTATIONS) - {"cudnn"}):
    model = Qwen2ForCausalLM(config, Runtime(attention_impl=name, attention_block_size=4),
                             rngs=nnx.Rngs(0))
    logits[name] = np.asarray(model(ids, positions, segments))
real = segments > 0
for name, got in logits.items():
    np.testing.assert_allclose(got[real], logits["xla"][real], atol=1e-5, rtol=0, err_msg=name)
print(" ".join(sorted(registry.IMPLEMENTATIONS)))
"""


def test_importing_the_model_registers_every_implementation():
    result = subprocess.run(
        [sys.executable, "-c", PROGRAM],
        cwd=REPO_ROOT,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["cudnn", "pallas", "sequence_sharded", "splash", "xla"]
