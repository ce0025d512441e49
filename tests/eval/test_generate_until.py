"""`generate_until` of the qwen_jax lm-eval model beyond greedy decoding: sampling with a seeded,
advancing key, stop sequences, and generation arguments it does not support."""

import os

import jax
import pytest
import train_runs
from flax import nnx
from lm_eval.api.instance import Instance

from qwen_jax.data.train_tokenizer import DEMO_TOKENIZER_PATH
from qwen_jax.eval.harness import QwenJaxLM
from qwen_jax.model.transformer import Qwen2ForCausalLM

PROMPTS = [f"Q: What is {a} + {b}?\nA:" for a, b in ((1, 2), (3, 4), (5, 0), (2, 2))]


@pytest.fixture(scope="module")
def lm():
    model = Qwen2ForCausalLM(train_runs.tiny_config(), rngs=nnx.Rngs(0))
    nnx.update(model, jax.tree.map(lambda x: 4 * x, nnx.state(model, nnx.Param)))
    return QwenJaxLM.from_model(model, os.path.dirname(DEMO_TOKENIZER_PATH), None, batch_size=4)


def _requests(**kwargs):
    return [Instance("generate_until", {}, (p, dict(kwargs)), i) for i, p in enumerate(PROMPTS)]


def test_greedy_repeats_and_sampling_draws_anew(lm):
    greedy = _requests(until=["\n"], max_gen_toks=12, do_sample=False)
    assert lm.generate_until(greedy) == lm.generate_until(greedy)
    sampled = _requests(until=["\n"], max_gen_toks=12, do_sample=True, temperature=1.0)
    first, second = lm.generate_until(sampled), lm.generate_until(sampled)
    assert first != second  # the key advances from one call to the next
    assert first != lm.generate_until(greedy)
    assert not any("\n" in text for text in first + second)


def test_text_is_cut_at_the_first_stop_sequence(lm):
    free = lm.generate_until(_requests(until=[], max_gen_toks=12, do_sample=False))
    stop = next(text[1:3] for text in free if len(text) > 3)
    cut = lm.generate_until(_requests(until=[stop], max_gen_toks=12, do_sample=False))
    assert cut == [text.split(stop)[0] for text in free]


def test_unsupported_generation_arguments_are_refused(lm):
    with pytest.raises(ValueError, match=r"\['num_beams'\] are not supported"):
        lm.generate_until(_requests(until=["\n"], max_gen_toks=4, num_beams=4))
