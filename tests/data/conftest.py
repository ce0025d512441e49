"""Fixtures for the data-pipeline tests: the demo tokenizer and a small demo corpus on disk."""

import pathlib

import pytest

from qwen_jax.data import demo_corpus
from qwen_jax.data.tokenizer import Tokenizer
from qwen_jax.data.train_tokenizer import DEMO_TOKENIZER_PATH


@pytest.fixture(scope="session")
def demo_tokenizer():
    return Tokenizer.from_file(DEMO_TOKENIZER_PATH)


@pytest.fixture(scope="session")
def qwen_tokenizer(qwen_tokenizer_path):
    return Tokenizer.from_file(qwen_tokenizer_path)


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> pathlib.Path:
    directory = tmp_path_factory.mktemp("demo")
    demo_corpus.write_demo_data(directory, seed=0, scale=0.5)
    return directory
