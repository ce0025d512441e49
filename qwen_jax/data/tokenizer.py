"""A thin wrapper over a Hugging Face `tokenizers` tokenizer.json.

Works unchanged with Qwen2.5's tokenizer.json and with the project's demo tokenizer: the special
ids are looked up by their token strings, never hard-coded, so both vocabularies are served by
the same code.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence

import tokenizers

# The files of a Hugging Face tokenizer directory that travel with a model: the vocabulary, the
# chat template (tokenizer_config.json) and the stop ids (generation_config.json).
FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "generation_config.json",
)
TOKENIZER_JSON = "tokenizer.json"

EOS_TOKEN = "<|endoftext|>"
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"


def copy_files(source_dir: str, target_dir: str) -> list[str]:
    """Copies the `FILES` present in `source_dir` into `target_dir` (created); returns their
    names."""
    names = [n for n in FILES if os.path.isfile(os.path.join(source_dir, n))]
    if names:
        os.makedirs(target_dir, exist_ok=True)
    for name in names:
        shutil.copy(os.path.join(source_dir, name), os.path.join(target_dir, name))
    return names


def json_path(path: str | os.PathLike) -> str:
    """A tokenizer.json path from a path naming the file or its directory."""
    path = os.fspath(path)
    return os.path.join(path, TOKENIZER_JSON) if os.path.isdir(path) else path


class Tokenizer:
    """Text <-> token ids, plus the control ids the pipelines need.

    Args:
      tokenizer: a loaded `tokenizers.Tokenizer`.
      eos_token: appended between pre-training documents.
      pad_token: the id written into padding; Qwen2.5 pads with `<|endoftext|>`, hence the default.
        Padding is always masked by `segment_ids == 0` and `loss_mask == 0`, so its value is only
        cosmetic.
      im_start_token / im_end_token: ChatML turn delimiters.
    """

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        *,
        eos_token: str = EOS_TOKEN,
        pad_token: str | None = None,
        im_start_token: str = IM_START_TOKEN,
        im_end_token: str = IM_END_TOKEN,
    ):
        self._tok = tokenizer
        self.eos_id = self.token_id(eos_token)
        self.pad_id = self.eos_id if pad_token is None else self.token_id(pad_token)
        self.im_start_id = self.token_id(im_start_token)
        self.im_end_id = self.token_id(im_end_token)

    @classmethod
    def from_file(cls, path: str | os.PathLike, **kwargs) -> "Tokenizer":
        return cls(tokenizers.Tokenizer.from_file(os.fspath(path)), **kwargs)

    @property
    def special_ids(self) -> dict[str, int]:
        """The ids of the control tokens the pipelines write, by token."""
        return {self.decode([i]): i for i in (self.eos_id, self.im_start_id, self.im_end_id)}

    @property
    def vocab(self) -> dict[str, int]:
        """Every token, added ones included, with its id."""
        return self._tok.get_vocab(with_added_tokens=True)

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can emit (ranked tokens plus added control tokens)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int:
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise ValueError(f"Tokenizer has no token {token!r}")
        return token_id

    def encode(self, text: str) -> list[int]:
        # No post-processor template: Qwen2.5 adds no BOS, and ChatML markers are written as text.
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encodes many texts on all cores (the Rust side releases the GIL and uses a thread pool)."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        enc = self._tok.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
