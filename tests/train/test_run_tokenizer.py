"""A tokenizer that cannot belong to the model is refused before anything is written."""

import json

import pytest
import tokenizers
from tokenizers.models import WordLevel

from qwen_jax.data.tokenizer import Tokenizer
from qwen_jax.model.config import QwenConfig
from qwen_jax.train import run_tokenizer

CONFIG = QwenConfig(
    hidden_size=8,
    intermediate_size=16,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    vocab_size=32,
    eos_token_id=10,
)


def _write(path, im_start_id: int = 11):
    """A word-level tokenizer: w0..w9, <|endoftext|> 10, <|im_start|> `im_start_id`, <|im_end|> 13."""
    vocab = {f"w{i}": i for i in range(10)}
    vocab.update({"<|endoftext|>": 10, "<|im_start|>": im_start_id, "<|im_end|>": 13})
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizers.Tokenizer(WordLevel(vocab, unk_token="w0")).save(str(path))
    return str(path)


def test_the_checkpoints_own_tokenizer_is_accepted(tmp_path):
    own = _write(tmp_path / "ckpt" / "tokenizer" / "tokenizer.json")
    assert run_tokenizer.resolve(None, str(tmp_path / "ckpt")) == own
    run_tokenizer.check(Tokenizer.from_file(own), own, CONFIG, str(tmp_path / "ckpt"))


def test_other_control_ids_than_the_checkpoints_tokenizer_are_refused(tmp_path):
    _write(tmp_path / "ckpt" / "tokenizer" / "tokenizer.json")
    named = _write(tmp_path / "other" / "tokenizer.json", im_start_id=12)
    with pytest.raises(ValueError, match="differ from those of the checkpoint's tokenizer"):
        run_tokenizer.check(Tokenizer.from_file(named), named, CONFIG, str(tmp_path / "ckpt"))


def test_stop_ids_of_the_generation_config_must_be_the_tokenizers(tmp_path):
    own = _write(tmp_path / "ckpt" / "tokenizer" / "tokenizer.json")
    (tmp_path / "ckpt" / "tokenizer" / "generation_config.json").write_text(
        json.dumps({"eos_token_id": [13, 20]})
    )
    with pytest.raises(ValueError, match=r"generation_config.json stops at ids \[20\]"):
        run_tokenizer.check(Tokenizer.from_file(own), own, CONFIG, str(tmp_path / "ckpt"))


def test_more_ids_than_the_vocabulary_or_another_eos_are_refused(tmp_path):
    named = _write(tmp_path / "tokenizer.json")
    with pytest.raises(ValueError, match="the model's eos_token_id is 99"):
        run_tokenizer.check(
            Tokenizer.from_file(named), named, CONFIG.replace(eos_token_id=99), None
        )
    with pytest.raises(ValueError, match="it has 13 ids, the model's vocabulary 8"):
        run_tokenizer.check(Tokenizer.from_file(named), named, CONFIG.replace(vocab_size=8), None)
