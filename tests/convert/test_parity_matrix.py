"""Logit parity with transformers over the architecture variants Qwen2.5 uses.

GQA ratios 1, 2 and 7 (the 0.5B preset has 14 query heads over 2 KV heads), head_dim 64 and 128,
tied and untied embeddings, YaRN on and off, each on a left-padded batch.
"""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import hf_model, left_padded_batch, tiny_config
from qwen_jax.convert import hf
from qwen_jax.model.config import RopeScaling
from qwen_jax.model.generate import prompt_positions
from qwen_jax.model.layers import Runtime

YARN = RopeScaling(factor=4.0, original_max_position_embeddings=16)

VARIANTS = [
    pytest.param(
        dict(num_attention_heads=4, num_key_value_heads=4, hidden_size=256), id="gqa1-hd64-untied"
    ),
    pytest.param(
        dict(
            num_attention_heads=4, num_key_value_heads=2, hidden_size=512, tie_word_embeddings=True
        ),
        id="gqa2-hd128-tied",
    ),
    pytest.param(
        dict(num_attention_heads=7, num_key_value_heads=1, hidden_size=448, rope_scaling=YARN),
        id="gqa7-hd64-yarn",
    ),
    pytest.param(
        dict(
            num_attention_heads=2,
            num_key_value_heads=1,
            hidden_size=256,
            tie_word_embeddings=True,
            rope_scaling=YARN,
        ),
        id="gqa2-hd128-tied-yarn",
    ),
]


def _reference_and_ours(tmp_path, changes, runtime, std):
    config = tiny_config(num_hidden_layers=2, **changes)
    reference = hf_model(config, std=std)
    reference.save_pretrained(tmp_path / "hf", safe_serialization=True)
    ids, mask = left_padded_batch(config.vocab_size, length=40)
    with torch.no_grad():
        want = reference(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    model = hf.load_model(tmp_path / "hf", runtime)
    got = np.asarray(model(jnp.asarray(ids), prompt_positions(mask), jnp.asarray(mask)))
    return want, got, mask.astype(bool)


@pytest.mark.parametrize("changes", VARIANTS)
def test_float32_logits_match_transformers(tmp_path, changes):
    want, got, real = _reference_and_ours(tmp_path, changes, Runtime(), std=0.2)
    assert np.abs(got - want)[real].max() <= 1e-4


def test_bfloat16_compute_keeps_the_argmax(tmp_path):
    """bf16 compute over fp32 parameters (the training setting) against transformers in fp32."""
    # With init std 0.05 the logits spread over several units, so ties do not decide the argmax.
    want, got, real = _reference_and_ours(
        tmp_path,
        dict(num_attention_heads=7, num_key_value_heads=1, hidden_size=448),
        Runtime(dtype="bfloat16"),
        std=0.05,
    )
    agreement = np.mean(got.argmax(-1)[real] == want.argmax(-1)[real])
    assert agreement >= 0.99, agreement
