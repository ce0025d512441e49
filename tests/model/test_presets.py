"""The Qwen2.5 size presets in configs/models against transformers and the published sizes."""

import pathlib

import gin
import pytest
import torch
import transformers
from flax import nnx

from qwen_jax import configurables
from qwen_jax.model.config import QwenConfig, parameter_count
from qwen_jax.model.transformer import Qwen2ForCausalLM

CONFIGS = pathlib.Path(__file__).resolve().parents[2] / "configs" / "models"
# Model-card sizes (billions, total and non-embedding); exact counts are checked against
# transformers. Totals must be within 0.5% of the card or equal to it at the card's printed
# precision (0.494B is printed 0.49B), except Qwen2.5-32B, whose card says 32.5B
# while its own config.json gives 32.76B (+0.8%, transformers' count): that gap is asserted as it
# is, so the preset is held to the architecture, not to the card's rounding.
PUBLISHED = {
    "qwen2_5_0_5b": (0.49, 0.36),
    "qwen2_5_1_5b": (1.54, 1.31),
    "qwen2_5_3b": (3.09, 2.77),
    "qwen2_5_7b": (7.61, 6.53),
    "qwen2_5_14b": (14.7, 13.1),
    "qwen2_5_32b": (32.5, 31.0),
    "qwen2_5_72b": (72.7, 70.0),
}


def load(*files) -> QwenConfig:
    gin.clear_config()
    try:
        gin.parse_config_files_and_bindings([str(CONFIGS / f) for f in files], [])
        return configurables.QwenConfig()
    finally:
        gin.clear_config()


def test_every_preset_is_listed():
    assert {p.stem for p in CONFIGS.glob("qwen2_5_*.gin")} == set(PUBLISHED)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_matches_transformers_parameter_count(name):
    config = load(f"{name}.gin")
    with torch.device("meta"):
        reference = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**config.to_hf_config()))
    expected = sum(p.numel() for p in reference.parameters())
    assert parameter_count(config) == expected
    total, non_embedding = PUBLISHED[name]
    embedding = config.vocab_size * config.hidden_size * (1 if config.tie_word_embeddings else 2)
    deviation = abs(expected / 1e9 - total) / total
    if name == "qwen2_5_32b":
        assert 0.007 < deviation < 0.009
    else:
        decimals = len(str(total).split(".")[1])
        assert deviation <= 0.005 or round(expected / 1e9, decimals) == total
    assert abs((expected - embedding) / 1e9 - non_embedding) <= 0.01 * non_embedding


def test_abstract_model_has_the_closed_form_count():
    config = load("qwen2_5_7b.gin")
    model = nnx.eval_shape(lambda: Qwen2ForCausalLM(config, rngs=nnx.Rngs(0)))
    leaves = nnx.to_flat_state(nnx.state(model, nnx.Param))
    assert sum(v.get_value().size for _, v in leaves) == parameter_count(config)


def test_yarn_overlay():
    config = load("qwen2_5_7b.gin", "yarn_128k.gin")
    assert config.rope_scaling.factor == 4.0
    assert config.rope_scaling.original_max_position_embeddings == 32_768
    assert config.max_position_embeddings == 131_072
    assert config.to_hf_config()["rope_scaling"]["type"] == "yarn"
