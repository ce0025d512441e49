"""Numerical parity of the forward and backward pass with transformers' Qwen2ForCausalLM."""

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from conftest import left_padded_batch
from qwen_jax.convert import hf
from qwen_jax.model.generate import prompt_positions
from qwen_jax.model.layers import Runtime


def test_packed_documents_match_separate_transformers_runs(hf_checkpoint):
    """Three documents packed in one row (segments 1, 2, 3, then padding) attend only within
    themselves and restart positions, exactly as if transformers ran each on its own."""
    config, reference, directory = hf_checkpoint
    lengths = (9, 14, 6)
    rng = np.random.RandomState(1)
    docs = [rng.randint(0, config.vocab_size, n) for n in lengths]
    pad = 3
    ids = np.concatenate(docs + [np.zeros(pad, int)])[None]
    segments = np.concatenate([np.full(n, s + 1) for s, n in enumerate(lengths)] + [np.zeros(pad)])
    positions = np.concatenate([np.arange(n) for n in lengths] + [np.zeros(pad)])
    logits = hf.load_model(directory)(
        jnp.asarray(ids),
        jnp.asarray(positions[None], jnp.int32),
        jnp.asarray(segments[None], jnp.int32),
    )
    logits = np.asarray(logits)[0]
    start = 0
    for doc in docs:
        with torch.no_grad():
            expected = reference(torch.tensor(doc[None])).logits[0].numpy()
        np.testing.assert_allclose(logits[start : start + len(doc)], expected, rtol=0, atol=1e-5)
        start += len(doc)


def _loss(logits, labels, weights):
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
    return jnp.sum(nll * weights) / jnp.sum(weights)


def test_loss_gradients_match_torch_autograd(hf_checkpoint):
    config, reference, directory = hf_checkpoint
    ids, mask = left_padded_batch(config.vocab_size)
    labels, weights = ids[:, 1:], mask[:, 1:] * mask[:, :-1]

    reference.zero_grad()
    logits = reference(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(
        logits.reshape(-1, config.vocab_size), torch.tensor(labels).reshape(-1), reduction="none"
    )
    w = torch.tensor(weights, dtype=torch.float32).reshape(-1)
    torch_loss = (nll * w).sum() / w.sum()
    torch_loss.backward()

    model = hf.load_model(directory)
    graphdef, params = nnx.split(model, nnx.Param)

    def loss_fn(params):
        m = nnx.merge(graphdef, params)
        out = m(jnp.asarray(ids), prompt_positions(mask), jnp.asarray(mask))[:, :-1]
        return _loss(out, jnp.asarray(labels), jnp.asarray(weights, jnp.float32))

    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
    np.testing.assert_allclose(float(loss), torch_loss.item(), rtol=1e-6)
    # The gradient tree has the parameters' structure, so the export table names it in HF terms.
    grad_tensors = dict(hf.hf_tensors(nnx.merge(graphdef, grads)))
    named = dict(reference.named_parameters())
    assert set(grad_tensors) == set(named) - (
        {"lm_head.weight"} if config.tie_word_embeddings else set()
    )
    for name, thunk in grad_tensors.items():
        expected = named[name].grad.numpy()
        np.testing.assert_allclose(thunk(), expected, rtol=1e-4, atol=1e-6, err_msg=name)


def test_bfloat16_error_no_worse_than_transformers_bfloat16(hf_checkpoint):
    """In bfloat16 both implementations round differently; each is judged by its distance from
    the float32 result. Ours must be of the same size as transformers' own bfloat16 error (within
    1.5x: the two round at different points, e.g. we accumulate the logits matmul in float32)."""
    config, reference, directory = hf_checkpoint
    ids, mask = left_padded_batch(config.vocab_size)
    real = mask.astype(bool)
    with torch.no_grad():
        exact = reference(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
        theirs = reference.to(torch.bfloat16)(torch.tensor(ids), attention_mask=torch.tensor(mask))
        theirs = theirs.logits.float().numpy()
    model = hf.load_model(directory, Runtime(dtype="bfloat16", param_dtype="bfloat16"))
    ours = np.asarray(model(jnp.asarray(ids), prompt_positions(mask), jnp.asarray(mask)))
    their_error = np.abs(theirs - exact)[real]
    our_error = np.abs(ours - exact)[real]
    assert their_error.max() > 0  # bfloat16 really ran
    assert our_error.mean() <= 1.5 * their_error.mean()
    assert our_error.max() <= 1.5 * their_error.max()
