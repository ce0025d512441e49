"""The tokenizer of a training run: the one named (`setup.RunConfig.tokenizer_path`), else the one the
initial checkpoint carries; never a silent default.

Before anything is written, the tokenizer is checked against the model: it may not have more ids
than the model's vocabulary, the model's `eos_token_id` must be its `<|endoftext|>` or
`<|im_end|>`, and its control tokens must have the ids of the initial checkpoint's own tokenizer
and generation config. The run keeps a copy in `<workdir>/tokenizer/`, so its checkpoints carry
their tokenizer to later runs (`init_from`) and to the export.
"""

from __future__ import annotations

import json
import os
import shutil

from absl import logging

from qwen_jax.checkpoint import model_io
from qwen_jax.data import tokenizer as tokenizer_lib
from qwen_jax.data.tokenizer import Tokenizer
from qwen_jax.model.config import QwenConfig


def resolve(tokenizer_path: str | None, init_from: str | None) -> str:
    """The tokenizer.json the run uses."""
    if tokenizer_path is not None:
        path = tokenizer_lib.json_path(tokenizer_path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"setup.RunConfig.tokenizer_path={tokenizer_path}: no {path}")
        return path
    if init_from is None:
        raise ValueError(
            "no tokenizer: a run from scratch must name one with "
            "--gin_param=\"setup.RunConfig.tokenizer_path='DIR/tokenizer.json'\""
        )
    directory = model_io.tokenizer_dir(init_from)
    if directory is None:
        raise ValueError(
            f"init_from={init_from} carries no tokenizer: name one with "
            f"--gin_param=\"setup.RunConfig.tokenizer_path='DIR/tokenizer.json'\""
        )
    return os.path.join(directory, tokenizer_lib.TOKENIZER_JSON)


def _generation_stop_ids(directory: str) -> list[int]:
    path = os.path.join(directory, "generation_config.json")
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        ids = json.load(f).get("eos_token_id")
    return [] if ids is None else [ids] if isinstance(ids, int) else list(ids)


def check(tokenizer: Tokenizer, path: str, config: QwenConfig, init_from: str | None) -> None:
    """Refuses, in one line, a tokenizer that cannot belong to the model."""
    mismatch = f"tokenizer {path} does not belong to the model"
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(
            f"{mismatch}: it has {tokenizer.vocab_size} ids, the model's vocabulary "
            f"{config.vocab_size}"
        )
    stop_ids = {tokenizer.eos_id, tokenizer.im_end_id}
    if config.eos_token_id not in stop_ids:
        raise ValueError(
            f"{mismatch}: the model's eos_token_id is {config.eos_token_id}, the "
            f"tokenizer's special ids are {tokenizer.special_ids}"
        )
    own_dir = None if init_from is None else model_io.tokenizer_dir(init_from)
    if own_dir is None:
        return
    own = Tokenizer.from_file(os.path.join(own_dir, tokenizer_lib.TOKENIZER_JSON))
    if own.special_ids != tokenizer.special_ids:
        raise ValueError(
            f"{mismatch}: its special ids {tokenizer.special_ids} differ from "
            f"those of the checkpoint's tokenizer {own_dir} {own.special_ids}"
        )
    unknown = sorted(set(_generation_stop_ids(own_dir)) - stop_ids)
    if unknown:
        raise ValueError(
            f"{mismatch}: the checkpoint's generation_config.json stops at ids "
            f"{unknown}, which are not its <|endoftext|> or <|im_end|> "
            f"{tokenizer.special_ids}"
        )


def identity(tokenizer: Tokenizer) -> dict:
    """What a resumed run's tokenizer must share with the run's first start."""
    return {"vocab_size": tokenizer.vocab_size, "special_ids": tokenizer.special_ids}


def keep(workdir: str, path: str) -> None:
    """Copies the tokenizer files beside `path` into `<workdir>/tokenizer/` (once)."""
    target = os.path.join(workdir, model_io.TOKENIZER)
    if os.path.exists(target):
        return
    staging = target + ".partial"
    shutil.rmtree(staging, ignore_errors=True)  # left by an interrupted start
    os.makedirs(staging)
    tokenizer_lib.copy_files(os.path.dirname(path), staging)
    shutil.copy(path, os.path.join(staging, tokenizer_lib.TOKENIZER_JSON))  # whatever its name
    os.rename(staging, target)
    logging.info("tokenizer files kept in %s", target)
