"""Tiny transformers Qwen2 models: the independent reference for conversion and parity tests."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers

from qwen_jax.model.config import QwenConfig, RopeScaling

TINY = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=256,
    bos_token_id=99,
    eos_token_id=100,
)


def tiny_config(**changes) -> QwenConfig:
    return QwenConfig(**{**TINY, **changes})


def hf_model(config: QwenConfig, seed: int = 0, std: float = 0.2) -> transformers.Qwen2ForCausalLM:
    """A float32 HF model with every weight (biases and norms included) drawn at random.

    transformers initialises biases to zero and norms to one, which would hide transposed or
    mis-assigned biases and norm scales; a wide normal makes every tensor matter.
    """
    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**config.to_hf_config()))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std)
    return model.eval().float()


@pytest.fixture(
    params=[
        pytest.param(dict(tie_word_embeddings=False), id="untied"),
        pytest.param(
            dict(
                tie_word_embeddings=True,
                rope_scaling=RopeScaling(factor=4.0, original_max_position_embeddings=16),
            ),
            id="tied-yarn",
        ),
    ]
)
def hf_checkpoint(request, tmp_path):
    """(config, HF model, directory of its safetensors checkpoint in several shards)."""
    config = tiny_config(**request.param)
    model = hf_model(config)
    model.save_pretrained(tmp_path / "hf", max_shard_size="60KB", safe_serialization=True)
    return config, model, tmp_path / "hf"


def left_padded_batch(vocab: int, batch: int = 3, length: int = 24, seed: int = 0):
    """ids and an attention mask whose rows start with 0, 5 and 11 padding tokens."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(0, vocab, (batch, length))
    mask = np.ones_like(ids)
    for row, pad in enumerate((0, 5, 11)[:batch]):
        mask[row, :pad] = 0
        ids[row, :pad] = 0
    return ids, mask


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run(module, *args):
    """`python -m module args...` from the repository root, on the CPU."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO_ROOT,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=300,
    )
