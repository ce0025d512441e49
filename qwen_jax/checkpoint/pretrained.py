"""A model from whatever a user points at: a Hugging Face directory (config.json + safetensors)
or a qwen_jax checkpoint (import_hf's output or a training step directory)."""

from __future__ import annotations

import json
import os

from qwen_jax.checkpoint import model_io
from qwen_jax.convert import hf as hf_convert
from qwen_jax.data import tokenizer as tokenizer_lib
from qwen_jax.model.config import QwenConfig
from qwen_jax.model.layers import Runtime
from qwen_jax.parallel import host_data


def is_hf_directory(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, "config.json"))


def load(pretrained: str, runtime: Runtime, placement: host_data.Placement | None, what: str = ""):
    """(model, config, the directory of its tokenizer files or None), sharded by `placement`
    (None: on the default device). `what` names the setting in errors (default: the path)."""
    directory = os.path.abspath(os.fspath(pretrained))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{what or pretrained}: no such directory")
    mesh, rules = (None, None) if placement is None else (placement.mesh, placement.rules)
    if is_hf_directory(directory):
        model = hf_convert.load_model(directory, runtime, mesh=mesh, rules=rules)
        return model, model.config, directory
    model = model_io.load_model(directory, runtime, mesh=mesh, rules=rules)
    return model, model.config, model_io.tokenizer_dir(directory)


def read_config(pretrained: str) -> tuple[QwenConfig, str | None]:
    """(architecture, the directory of its tokenizer files or None), reading no weights."""
    directory = os.path.abspath(os.fspath(pretrained))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{pretrained}: no such directory")
    if is_hf_directory(directory):
        path = os.path.join(directory, "config.json")
        with open(path, encoding="utf-8") as f:
            config = QwenConfig.from_hf_config(json.load(f), source=path)
        has_tokenizer = os.path.isfile(os.path.join(directory, tokenizer_lib.TOKENIZER_JSON))
        return config, directory if has_tokenizer else None
    return model_io.read_model_config(directory), model_io.tokenizer_dir(directory)
