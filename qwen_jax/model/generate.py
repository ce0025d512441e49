"""Autoregressive decoding with the KV cache: prefill once, then one token per step.

Prompts are left-padded so every row's last prompt token sits in the same column; positions count
real tokens only (`clip(cumsum(mask) - 1, 0)`) and padding gets segment id 0, which the attention
mask rule excludes. The decode loop is a `lax.while_loop` that stops as soon as every row has
produced a stop token, so one compiled program serves any number of new tokens up to the budget.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from qwen_jax.model.transformer import KVCache, Qwen2ForCausalLM


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How a token is drawn from the logits. `temperature=0` is greedy (argmax)."""

    temperature: float = 0.0
    top_k: int = 0  # 0 keeps every token
    top_p: float = 1.0  # nucleus: the smallest set of most likely tokens with mass >= top_p

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"Sampling.temperature={self.temperature} must be >= 0")
        if self.top_k < 0:
            raise ValueError(f"Sampling.top_k={self.top_k} must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"Sampling.top_p={self.top_p} must be in (0, 1]")


def filter_logits(logits: jax.Array, top_k: int, top_p: float) -> jax.Array:
    """float32 logits [..., vocab] with tokens outside the top-k / nucleus set at -inf."""
    logits = logits.astype(jnp.float32)
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # A token is kept when the mass strictly before it is below top_p: this keeps the most
        # likely token always, and exactly the smallest prefix whose mass reaches top_p.
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        kept = jnp.where(mass_before < top_p, sorted_logits, jnp.inf)
        threshold = jnp.min(kept, axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return logits


def sample(logits: jax.Array, rng: jax.Array, sampling: Sampling) -> jax.Array:
    """Token ids [batch] from logits [batch, vocab]."""
    if sampling.temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    filtered = filter_logits(logits / sampling.temperature, sampling.top_k, sampling.top_p)
    return jax.random.categorical(rng, filtered, axis=-1).astype(jnp.int32)


def prompt_positions(mask: jax.Array) -> jax.Array:
    """Positions for a left-padded batch: real tokens count 0, 1, ...; padding sits at 0."""
    return jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)


def generate(
    model: Qwen2ForCausalLM,
    prompt_ids: jax.Array,
    prompt_mask: jax.Array,
    *,
    max_new_tokens: int,
    stop_tokens: Sequence[int],
    sampling: Sampling | None = None,
    rng: jax.Array | None = None,
    pad_id: int | None = None,
    cache_dtype=None,
) -> tuple[jax.Array, jax.Array]:
    """Continues left-padded prompts [batch, prompt_len] by up to `max_new_tokens`.

    Returns (tokens [batch, max_new_tokens], lengths [batch]). A row's length counts its tokens up
    to and including its first stop token; the positions after it hold `pad_id` (default: the
    first stop token).
    """
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be positive")
    if not stop_tokens:
        raise ValueError("stop_tokens is empty: give at least one token id that ends a sequence")
    prompt_ids = jnp.asarray(prompt_ids, jnp.int32)
    prompt_mask = jnp.asarray(prompt_mask, jnp.int32)
    if prompt_ids.shape != prompt_mask.shape:
        raise ValueError(
            f"prompt_ids {prompt_ids.shape} and prompt_mask {prompt_mask.shape} differ"
        )
    if not bool(jnp.all(prompt_mask[:, -1] == 1)):
        raise ValueError("prompts must be left-padded: prompt_mask[:, -1] must be 1 in every row")
    rng = jax.random.key(0) if rng is None else rng
    graphdef, state = nnx.split(model)
    return _generate(
        graphdef,
        state,
        prompt_ids,
        prompt_mask,
        rng,
        max_new_tokens=max_new_tokens,
        stop_tokens=tuple(int(t) for t in stop_tokens),
        sampling=sampling or Sampling(),
        pad_id=int(stop_tokens[0] if pad_id is None else pad_id),
        cache_dtype=jnp.dtype(cache_dtype or model.runtime.compute_dtype),
    )


@functools.partial(
    jax.jit,
    static_argnames=(
        "graphdef",
        "max_new_tokens",
        "stop_tokens",
        "sampling",
        "pad_id",
        "cache_dtype",
    ),
)
def _generate(
    graphdef,
    state,
    prompt_ids,
    prompt_mask,
    rng,
    *,
    max_new_tokens,
    stop_tokens,
    sampling,
    pad_id,
    cache_dtype,
):
    model = nnx.merge(graphdef, state)
    batch, prompt_len = prompt_ids.shape
    cache = KVCache.create(model.config, batch, prompt_len + max_new_tokens, cache_dtype)
    positions = prompt_positions(prompt_mask)
    hidden, cache = model.hidden_states(prompt_ids, positions, prompt_mask, cache)
    logits = model.logits(hidden[:, -1:])[:, 0]
    stops = jnp.asarray(stop_tokens, jnp.int32)

    def cond(carry):
        step, _, _, _, _, done, _ = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        step, cache, logits, position, rng, done, tokens = carry
        rng, step_rng = jax.random.split(rng)
        token = jnp.where(done, pad_id, sample(logits, step_rng, sampling))
        tokens = tokens.at[:, step].set(token)
        done = done | jnp.isin(token, stops)
        position = position + 1
        hidden, cache = model.hidden_states(
            token[:, None], position[:, None], jnp.ones((batch, 1), jnp.int32), cache
        )
        return step + 1, cache, model.logits(hidden)[:, 0], position, rng, done, tokens

    init = (
        jnp.zeros((), jnp.int32),
        cache,
        logits,
        positions[:, -1],
        rng,
        jnp.zeros((batch,), bool),
        jnp.full((batch, max_new_tokens), pad_id, jnp.int32),
    )
    *_, tokens = jax.lax.while_loop(cond, body, init)
    is_stop = jnp.isin(tokens, stops)
    first_stop = jnp.where(is_stop.any(axis=1), jnp.argmax(is_stop, axis=1) + 1, max_new_tokens)
    return tokens, first_stop.astype(jnp.int32)
