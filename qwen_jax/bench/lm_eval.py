"""lm-eval `loglikelihood` requests per second: qwen_jax's model against lm-eval's Hugging Face
backend (transformers on torch), on the same model and requests, in one run.

    python -m qwen_jax.bench.lm_eval --hidden_size=512 --layers=8 --requests=512

A random model of the given size over the demo vocabulary is written as a qwen_jax checkpoint
and its float32 export; the requests are the demo multiple-choice task's, one-shot: distinct
contexts with four options each (lm-eval's hf model and ours both score a context's one-token
options in one pass). Each backend answers them once untimed (compilation, caches), then `--repeats`
timed passes; the line per backend gives the best pass. Needs the `eval` and `test` extras.
"""

from __future__ import annotations

import itertools
import json
import os
import tempfile
import time

import jax
from absl import app, flags
from flax import nnx

from qwen_jax.checkpoint import model_io
from qwen_jax.convert import hf
from qwen_jax.data.train_tokenizer import DEMO_TOKENIZER_PATH
from qwen_jax.data.tokenizer import Tokenizer
from qwen_jax.eval import demo_tasks
from qwen_jax.model.config import QwenConfig
from qwen_jax.model.transformer import Qwen2ForCausalLM

HIDDEN = flags.DEFINE_integer("hidden_size", 512, "model width")
LAYERS = flags.DEFINE_integer("layers", 8, "decoder layers")
REQUESTS = flags.DEFINE_integer("requests", 512, "loglikelihood requests per pass")
BATCH = flags.DEFINE_integer("batch_size", 32, "requests per batch (both backends)")
REPEATS = flags.DEFINE_integer("repeats", 2, "timed passes per backend")


def requests(count: int) -> list:
    """`count` requests as a one-shot multiple-choice task makes them: distinct contexts (one
    solved question, then another) with four options each."""
    from lm_eval.api.instance import Instance

    docs = demo_tasks.fact_docs()
    contexts = (
        (
            f"Q: {shot['question']}\nA: {shot['choices'][shot['answer']]}\n\nQ: {doc['question']}\nA:",
            doc,
        )
        for shot, doc in itertools.permutations(docs, 2)
    )
    pairs = [(context, f" {choice}") for context, doc in contexts for choice in doc["choices"]]
    if count > len(pairs):
        raise ValueError(f"--requests={count}: at most {len(pairs)}")
    return [Instance("loglikelihood", {}, pairs[i], i, ("bench", i, 1)) for i in range(count)]


def write_model(directory: str) -> tuple[str, str]:
    tokenizer = Tokenizer.from_file(DEMO_TOKENIZER_PATH)
    config = QwenConfig(
        hidden_size=HIDDEN.value,
        intermediate_size=4 * HIDDEN.value,
        num_hidden_layers=LAYERS.value,
        num_attention_heads=max(1, HIDDEN.value // 64),
        num_key_value_heads=max(1, HIDDEN.value // 256),
        vocab_size=640,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.eos_id,
        eos_token_id=tokenizer.eos_id,
    )
    model = Qwen2ForCausalLM(config, rngs=nnx.Rngs(0))
    checkpoint, export = os.path.join(directory, "ckpt"), os.path.join(directory, "hf")
    model_io.save_model_checkpoint(
        checkpoint,
        model_io.model_params(model),
        config,
        tokenizer_from=os.path.dirname(DEMO_TOKENIZER_PATH),
    )
    hf.save_model(
        model, export, dtype="float32", tokenizer_dir=os.path.join(checkpoint, "tokenizer")
    )
    return checkpoint, export


def timed(lm, batch: list) -> tuple[float, list]:
    answers = lm.loglikelihood(batch, disable_tqdm=True)  # compiles, warms caches
    best = float("inf")
    for _ in range(REPEATS.value):
        start = time.perf_counter()
        lm.loglikelihood(batch, disable_tqdm=True)
        best = min(best, time.perf_counter() - start)
    return len(batch) / best, answers


def main(argv) -> None:
    del argv
    from lm_eval.models.huggingface import HFLM

    from qwen_jax.eval.harness import QwenJaxLM

    batch = requests(REQUESTS.value)
    with tempfile.TemporaryDirectory() as directory:
        checkpoint, export = write_model(directory)
        ours = QwenJaxLM(pretrained=checkpoint, batch_size=BATCH.value)
        ours.scorer.show_progress = False
        theirs = HFLM(pretrained=export, dtype="float32", batch_size=BATCH.value, device="cpu")
        rates, answers = {}, {}
        for name, lm in (("qwen_jax", ours), ("hf", theirs)):
            rates[name], answers[name] = timed(lm, batch)
    difference = max(abs(a[0] - b[0]) for a, b in zip(answers["qwen_jax"], answers["hf"]))
    print(
        json.dumps(
            {
                "device": jax.devices()[0].device_kind,
                "hidden_size": HIDDEN.value,
                "layers": LAYERS.value,
                "requests": len(batch),
                "batch_size": BATCH.value,
                "qwen_jax_requests_per_s": round(rates["qwen_jax"], 1),
                "hf_requests_per_s": round(rates["hf"], 1),
                "max_abs_logprob_difference": difference,
            }
        )
    )


if __name__ == "__main__":
    app.run(main)
