"""Model scores equal a direct forward pass with the model (fp32, 1e-5): perplexity as the mean
token NLL after the document separator, the rating as the expected digit under the next-token
distribution renormalised over the digits; sharded over the 8-device CPU mesh they equal one
device."""

import os
import pathlib
import sys

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "parallel"))
from sharding_fixtures import rules_from_gin  # noqa: E402

from qwen_jax.checkpoint import model_io  # noqa: E402
from qwen_jax.data.quality import model_scores  # noqa: E402
from qwen_jax.data.quality.stage import Document  # noqa: E402
from qwen_jax.data.train_tokenizer import DEMO_TOKENIZER_PATH  # noqa: E402
from qwen_jax.parallel import host_data  # noqa: E402
from qwen_jax.parallel import mesh as mesh_lib  # noqa: E402

TEXTS = [
    "3 + 2 = 5\nQ: What is the capital of Zorvia?\nA: Kaloren",
    "The color of Velandia is red.",
    "x",
    "1 - 1 = 0 " * 30,
    "Q: What is 4 + 1?\nA: 5\nThe animal of Marosia is the owl.",
]


def save_checkpoint(directory, seed=0):
    """A random 2-layer model over the demo vocabulary, with the demo tokenizer."""
    import train_runs
    from flax import nnx

    from qwen_jax.model.transformer import Qwen2ForCausalLM

    config = train_runs.tiny_config(max_position_embeddings=512)
    model = Qwen2ForCausalLM(config, rngs=nnx.Rngs(seed))
    model_io.save_model_checkpoint(
        directory, model_io.model_params(model), config, os.path.dirname(DEMO_TOKENIZER_PATH)
    )


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("scorer") / "model"
    save_checkpoint(directory)
    return str(directory)


@pytest.fixture(scope="module")
def model(checkpoint):
    return model_io.load_model(checkpoint)


def _docs():
    return [Document({"text": t}, t, f"t:{i}") for i, t in enumerate(TEXTS)]


def _log_softmax(logits):
    logits = np.asarray(logits, np.float64)
    top = logits.max(-1, keepdims=True)
    return logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))


def _scored(stage, placement=None):
    stage.open(placement)
    docs = _docs()
    stage.process(docs)
    return docs


def test_perplexity_equals_direct_forward(checkpoint, model):
    stage = model_scores.Perplexity(checkpoint=checkpoint, max_tokens=48, batch_size=2)
    for doc in _scored(stage):
        ids = [stage.tokenizer.eos_id, *stage.tokenizer.encode(doc.text)[:48]]
        logps = _log_softmax(model(np.asarray([ids[:-1]], np.int32)))[0]
        nll = -logps[np.arange(len(ids) - 1), ids[1:]].mean()
        assert doc.record["perplexity_nll"] == pytest.approx(nll, abs=1e-5)
        assert doc.record["perplexity"] == pytest.approx(np.exp(nll), rel=1e-5)


def test_rating_equals_expected_digit_of_a_direct_forward(checkpoint, model):
    stage = model_scores.QualityRating(checkpoint=checkpoint, max_tokens=16, batch_size=4)
    ratings = []
    for doc in _scored(stage):
        excerpt = stage.tokenizer.decode(stage.tokenizer.encode(doc.text)[:16])
        prompt = stage.prompt_ids(excerpt)
        assert excerpt in stage.tokenizer.decode(prompt)
        logps = _log_softmax(model(np.asarray([prompt], np.int32)))[0, -1]
        digits = [stage.tokenizer.token_id(str(d)) for d in range(6)]
        p = np.exp(logps[digits])
        want = float(np.dot(np.arange(6), p / p.sum()))
        assert doc.record["quality_rating"] == pytest.approx(want, abs=1e-5)
        ratings.append(doc.record["quality_rating"])
    assert len(set(ratings)) == len(ratings)  # each document's own prompt


def test_range_removes_with_the_rule(checkpoint):
    stage = model_scores.Perplexity(checkpoint=checkpoint, max_tokens=48, max_perplexity=1.0)
    docs = _scored(stage)
    assert all(d.removed[0] == "perplexity/max_perplexity" for d in docs)


def test_sharded_scores_equal_one_device(checkpoint):
    placement = host_data.Placement(
        mesh_lib.make_mesh(mesh_lib.MeshConfig(data=2, fsdp=4)), rules_from_gin()
    )
    for make in (model_scores.Perplexity, model_scores.QualityRating):
        one = _scored(make(checkpoint=checkpoint, max_tokens=32, batch_size=4))
        sharded = _scored(make(checkpoint=checkpoint, max_tokens=32, batch_size=4), placement)
        field = make.field
        for a, b in zip(one, sharded):
            assert b.record[field] == pytest.approx(a.record[field], rel=1e-5, abs=1e-5)
