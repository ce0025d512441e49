"""Decoding throughput beside transformers' `generate`, on the same weights.

    python -m qwen_jax.bench.decode --gin_file=configs/demo/model.gin \
        --batch=4 --prompt_len=64 --new_tokens=64 --repeats=3

A random model of the gin file's architecture is exported with `convert.hf.save_model` and read
back by transformers' `Qwen2ForCausalLM` (SDPA attention), so both sides decode the same weights.
`layers.Runtime.param_dtype` is the weights' dtype on both sides (float32 by default; bfloat16,
with `layers.Runtime.dtype='bfloat16'` too, decodes a checkpoint as Qwen2.5's are published and
served), `layers.Runtime.dtype` our compute dtype; bf16 compute over float32 weights runs the
peer under bf16 autocast. Each of `--repeats` rounds times our `generate` (the
compiled KV-cache loop, after one compiling call) and then transformers' `generate`, greedy on
the same random left-padded prompts, every row generating all `--new_tokens` (no stop token ends
a row). Prints each round, then one JSON line: the medians of generated tokens/s, their ratio,
and in how many rows both sides chose the same tokens (greedy decoding of one model; a row can
part ways where two logits tie within rounding).
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time

import jax
import numpy as np
from absl import app, flags
from flax import nnx

from qwen_jax import cli
from qwen_jax.convert import hf
from qwen_jax.model.generate import generate
from qwen_jax.model.transformer import Qwen2ForCausalLM


def _prompts(vocab_size: int, batch: int, prompt_len: int):
    """Random prompts, row i left-padded by i tokens (0 is the padding id)."""
    rng = np.random.default_rng(0)
    ids = rng.integers(1, vocab_size - 1, (batch, prompt_len))
    mask = np.ones_like(ids)
    for row in range(batch):
        pad = min(row, prompt_len - 1)
        ids[row, :pad], mask[row, :pad] = 0, 0
    return ids.astype(np.int32), mask.astype(np.int32)


def _ours(model, ids, mask, new_tokens: int, stop: int):
    def call():
        tokens, lengths = generate(
            model, ids, mask, max_new_tokens=new_tokens, stop_tokens=(stop,), pad_id=0
        )
        return jax.block_until_ready(tokens), lengths

    call()  # compiles
    start = time.perf_counter()
    tokens, lengths = call()
    seconds = time.perf_counter() - start
    if int(np.max(lengths)) != new_tokens:
        raise RuntimeError(f"every row stopped before {new_tokens} tokens; no figure to report")
    return np.asarray(tokens), seconds


def _peer(model, ids, mask, new_tokens: int, autocast: bool):
    import torch

    inputs = dict(input_ids=torch.as_tensor(ids).long(), attention_mask=torch.as_tensor(mask))
    options = dict(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )

    def call():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return model.generate(**inputs, **options)[:, ids.shape[1] :].numpy()

    call()  # warms up
    start = time.perf_counter()
    tokens = call()
    return tokens, time.perf_counter() - start


def main() -> None:
    import torch
    import transformers

    from qwen_jax import configurables

    cli.parse_gin(cli.GIN_FILE.value, cli.GIN_PARAM.value)
    config, runtime = configurables.QwenConfig(), configurables.Runtime()
    model = Qwen2ForCausalLM(config, runtime, rngs=nnx.Rngs(0))
    with tempfile.TemporaryDirectory() as directory:
        hf.save_model(model, f"{directory}/hf", dtype=runtime.param_dtype)
        peer = transformers.Qwen2ForCausalLM.from_pretrained(
            f"{directory}/hf",
            dtype=getattr(torch, runtime.param_dtype),
            attn_implementation="sdpa",
        ).eval()
    autocast = runtime.dtype == "bfloat16" and runtime.param_dtype == "float32"
    ids, mask = _prompts(config.vocab_size, FLAGS.batch, FLAGS.prompt_len)
    generated = FLAGS.batch * FLAGS.new_tokens
    rounds = []
    for _ in range(FLAGS.repeats):
        ours_tokens, ours_s = _ours(model, ids, mask, FLAGS.new_tokens, config.vocab_size - 1)
        peer_tokens, peer_s = _peer(peer, ids, mask, FLAGS.new_tokens, autocast)
        rounds.append((generated / ours_s, generated / peer_s))
        print(
            json.dumps({"qwen_jax_tokens_per_s": rounds[-1][0], "peer_tokens_per_s": rounds[-1][1]})
        )
    ours, theirs = (statistics.median(side) for side in zip(*rounds))
    print(
        json.dumps(
            {
                "device": jax.devices()[0].device_kind,
                "dtype": runtime.dtype,
                "param_dtype": runtime.param_dtype,
                "batch": FLAGS.batch,
                "prompt_len": FLAGS.prompt_len,
                "new_tokens": FLAGS.new_tokens,
                "qwen_jax_tokens_per_s": round(ours, 1),
                "peer": f"transformers {transformers.__version__} + torch {torch.__version__}",
                "peer_param_dtype": str(peer.dtype).removeprefix("torch."),
                "peer_autocast": autocast,
                "peer_tokens_per_s": round(theirs, 1),
                "ratio": round(ours / theirs, 3),
                "rows_with_the_same_tokens": int(
                    np.sum(np.all(ours_tokens == peer_tokens, axis=1))
                ),
            }
        )
    )


if __name__ == "__main__":
    flags.DEFINE_integer("batch", 4, "rows decoded together")
    flags.DEFINE_integer("prompt_len", 64, "prompt tokens per row (row i left-padded by i)")
    flags.DEFINE_integer("new_tokens", 64, "tokens generated per row")
    flags.DEFINE_integer("repeats", 3, "rounds of ours then the peer's")
    FLAGS = flags.FLAGS
    app.run(lambda argv: sys.exit(cli.run(main, argv)))
