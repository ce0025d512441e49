"""Regenerates the project's demo tokenizer, `qwen_jax/demo_data/tokenizer.json`.

A byte-level BPE trained with `tokenizers` on the embedded demo corpus, built like Qwen2.5's: the
same pre-tokenizer regex (digits split one by one), NFC normalization, byte-level decoding, and
the same 22 control tokens placed after the ranked vocabulary. Training is deterministic, so
`python -m qwen_jax.data.train_tokenizer` reproduces the committed file byte for byte.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from qwen_jax.data import demo_corpus

# Qwen2.5's split: contractions, letter runs, single digits, punctuation runs, newlines, spaces.
QWEN_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# (token, special) in Qwen2.5's order; the first three are the ones the pipelines use.
CONTROL_TOKENS = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)

DEMO_TOKENIZER_PATH = os.path.join(
    os.path.dirname(os.path.dirname(__file__)), "demo_data", "tokenizer.json"
)


def build_demo_tokenizer(vocab_size: int = 1024, seed: int = 0) -> tokenizers.Tokenizer:
    """Trains the demo tokenizer: `vocab_size` ranked tokens, then the control tokens."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(tokenizers.Regex(QWEN_SPLIT_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(demo_corpus.tokenizer_training_texts(seed), trainer=trainer)
    for content, special in CONTROL_TOKENS:
        token = tokenizers.AddedToken(content, special=special, normalized=False)
        if special:
            tok.add_special_tokens([token])
        else:
            tok.add_tokens([token])
    return tok


def demo_tokenizer_json(vocab_size: int = 1024, seed: int = 0) -> str:
    return build_demo_tokenizer(vocab_size, seed).to_str(pretty=True) + "\n"


def main() -> None:
    with open(flags.FLAGS.output, "w", encoding="utf-8") as f:
        f.write(demo_tokenizer_json(flags.FLAGS.vocab_size))
    print(f"wrote {flags.FLAGS.output}")


if __name__ == "__main__":
    # Flags are defined only when run as a program, so importing this module (e.g. for
    # DEMO_TOKENIZER_PATH) never clashes with another program's flags.
    flags.DEFINE_string("output", DEMO_TOKENIZER_PATH, "Where to write tokenizer.json.")
    flags.DEFINE_integer("vocab_size", 1024, "Ranked tokens (control tokens come on top).")
    from qwen_jax import cli

    app.run(lambda argv: sys.exit(cli.run(main, argv)))
