"""Greedy decoding with the KV cache against transformers' `generate` on left-padded prompts."""

import jax.numpy as jnp
import numpy as np
import torch
import transformers

from conftest import left_padded_batch
from qwen_jax.convert import hf
from qwen_jax.model.generate import generate

NEW_TOKENS = 12


def test_greedy_generation_matches_transformers(hf_checkpoint):
    config, reference, directory = hf_checkpoint
    ids, mask = left_padded_batch(config.vocab_size)
    with torch.no_grad():
        expected = reference.generate(
            torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            do_sample=False,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            pad_token_id=0,
            generation_config=transformers.GenerationConfig(eos_token_id=None),
        )[:, ids.shape[1] :].numpy()

    # A stop token the model never produces here, so all NEW_TOKENS steps run as in transformers.
    unused = sorted(set(range(config.vocab_size)) - set(expected.ravel().tolist()))[0]
    tokens, lengths = generate(
        hf.load_model(directory),
        jnp.asarray(ids),
        jnp.asarray(mask),
        max_new_tokens=NEW_TOKENS,
        stop_tokens=[unused],
    )
    np.testing.assert_array_equal(np.asarray(tokens), expected)
    np.testing.assert_array_equal(np.asarray(lengths), NEW_TOKENS)


def test_rows_stop_independently_at_their_stop_token(hf_checkpoint):
    config, _, directory = hf_checkpoint
    model = hf.load_model(directory)
    ids, mask = left_padded_batch(config.vocab_size)
    free, _ = generate(model, ids, mask, max_new_tokens=NEW_TOKENS, stop_tokens=[-1], pad_id=0)
    free = np.asarray(free)
    # Stop on the token row 0 emits at step 3: row 0 must end there (length 4), the others at
    # their own first occurrence of it, if any.
    stop = int(free[0, 3])
    tokens, lengths = generate(
        model, ids, mask, max_new_tokens=NEW_TOKENS, stop_tokens=[stop], pad_id=0
    )
    tokens, lengths = np.asarray(tokens), np.asarray(lengths)
    for row in range(ids.shape[0]):
        hits = np.flatnonzero(free[row] == stop)
        length = hits[0] + 1 if hits.size else NEW_TOKENS
        assert lengths[row] == length
        np.testing.assert_array_equal(tokens[row, :length], free[row, :length])
        np.testing.assert_array_equal(tokens[row, length:], 0)
    assert lengths[0] <= 4
