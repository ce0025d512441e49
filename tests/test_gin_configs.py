"""Every shipped gin file (training, GRPO, lm-eval, data quality) parses: names, imports and
includes resolve."""

import glob
import os
import re

import gin
import pytest

from qwen_jax import configurables
from qwen_jax.cli import REPO_ROOT as ROOT
from qwen_jax.data.train_tokenizer import DEMO_TOKENIZER_PATH

FILES = sorted(
    os.path.relpath(p, ROOT)
    for pattern in (
        "configs/pretrain/*.gin",
        "configs/demo/*.gin",
        "configs/sft.gin",
        "configs/dpo.gin",
        "configs/reward_model.gin",
        "configs/grpo.gin",
        "configs/lm_eval.gin",
        "configs/quality/*.gin",
    )
    for p in glob.glob(os.path.join(ROOT, pattern))
)


def test_there_are_configs():
    assert "configs/demo/pretrain.gin" in FILES and "configs/sft.gin" in FILES


@pytest.mark.parametrize("path", FILES)
def test_parses(path):
    """Parses with a placeholder for each required macro (data paths, step counts), which the
    user binds on the command line; any other error fails the test."""
    bindings = []
    for _ in range(20):
        gin.clear_config()
        try:
            gin.add_config_file_search_path(ROOT)
            gin.parse_config_files_and_bindings([os.path.join(ROOT, path)], bindings)
            return
        except ValueError as e:
            required = re.match(r"(\w+)/macro.value set to `%gin.REQUIRED`", str(e))
            if not required:
                raise
            bindings.append(f"{required.group(1)} = 1")
        finally:
            gin.clear_config()
    pytest.fail(f"{path}: too many required macros: {bindings}")


def test_demo_model_matches_the_demo_tokenizer():
    """configs/demo/model.gin names the demo tokenizer's <|endoftext|> id and covers its vocab."""
    from qwen_jax.data.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_file(DEMO_TOKENIZER_PATH)
    gin.clear_config()
    try:
        gin.parse_config_files_and_bindings([os.path.join(ROOT, "configs/demo/model.gin")], [])
        config = configurables.QwenConfig()
    finally:
        gin.clear_config()
    assert config.bos_token_id == config.eos_token_id == tokenizer.eos_id
    assert tokenizer.vocab_size <= config.vocab_size < tokenizer.vocab_size + 128
