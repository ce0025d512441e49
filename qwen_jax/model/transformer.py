"""Qwen2ForCausalLM and Qwen2ForSequenceClassification in Flax NNX: one decoder (`Qwen2Model`),
its layers stacked and applied by `lax.scan`, under a language-model head or a score head.

Stacking makes compile time independent of depth: the decoder layer is traced once and its
parameters carry a leading "layers" axis. The heads subclass the decoder rather than wrap it, so
parameter paths stay those of the HF checkpoint without its "model." prefix.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from qwen_jax.model.config import QwenConfig
from qwen_jax.model.layers import (
    BATCH_LENGTH_EMBED,
    Qwen2DecoderLayer,
    RMSNorm,
    Runtime,
    make_param,
)
from qwen_jax.model.rope import rotary_tables
from qwen_jax.parallel.logical import constrain

# Which activations a rematerialized layer keeps for the backward pass (jax.checkpoint policies).
_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    # Every projection's output: the dots without batch dimensions, as JAX's
    # dots_with_no_batch_dims_saveable would pick if the projections were plain dot_generals
    # (they are custom_vjp calls, see layers.project, which that policy does not see).
    "save_dots": jax.checkpoint_policies.save_only_these_names(
        "qkv_proj", "out_proj", "mlp_gate_up", "mlp_out"
    ),
    "save_dots_except_mlp": jax.checkpoint_policies.save_only_these_names(
        "qkv_proj", "attn_out", "out_proj"
    ),
    "save_qkv_proj": jax.checkpoint_policies.save_only_these_names("qkv_proj"),
    "save_attn_out": jax.checkpoint_policies.save_only_these_names("attn_out", "out_proj"),
}
REMAT_POLICIES = ("none", *_REMAT_POLICIES)


class KVCache(NamedTuple):
    """Decoding state: per-layer keys and values plus, per slot, its segment id and position."""

    keys: jax.Array  # [layers, batch, max_len, kv_heads, head_dim]
    values: jax.Array
    segment_ids: jax.Array  # [batch, max_len]; 0 marks an empty or padding slot
    positions: jax.Array  # [batch, max_len]
    index: jax.Array  # scalar int32: the next slot to write

    @classmethod
    def create(cls, config: QwenConfig, batch: int, max_len: int, dtype) -> "KVCache":
        shape = (
            config.num_hidden_layers,
            batch,
            max_len,
            config.num_key_value_heads,
            config.head_dim,
        )
        return cls(
            jnp.zeros(shape, dtype),
            jnp.zeros(shape, dtype),
            jnp.zeros((batch, max_len), jnp.int32),
            jnp.zeros((batch, max_len), jnp.int32),
            jnp.zeros((), jnp.int32),
        )


def _normal_param(config: QwenConfig, runtime: Runtime, rngs: nnx.Rngs, shape, names):
    init = nnx.initializers.normal(config.initializer_range)
    return make_param(rngs, init, shape, names, runtime.param_dtype)


class Embedding(nnx.Module):
    def __init__(self, config: QwenConfig, runtime: Runtime, *, rngs: nnx.Rngs):
        self.runtime = runtime
        shape = (config.vocab_size, config.hidden_size)
        self.embedding = _normal_param(config, runtime, rngs, shape, ("vocab", "embed"))

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.runtime.compute_dtype)


class LMHead(nnx.Module):
    def __init__(self, config: QwenConfig, runtime: Runtime, *, rngs: nnx.Rngs):
        shape = (config.hidden_size, config.vocab_size)
        self.kernel = _normal_param(config, runtime, rngs, shape, ("embed", "vocab"))


class Qwen2Model(nnx.Module):
    """The decoder without a head: embeddings, stacked layers, final norm."""

    def __init__(self, config: QwenConfig, runtime: Runtime | None = None, *, rngs: nnx.Rngs):
        runtime = runtime or Runtime()
        if runtime.remat_policy not in REMAT_POLICIES:
            raise ValueError(
                f"remat_policy={runtime.remat_policy!r}; choose one of {REMAT_POLICIES}"
            )
        self.config = config
        self.runtime = runtime
        self.embed_tokens = Embedding(config, runtime, rngs=rngs)

        @nnx.split_rngs(splits=config.num_hidden_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def stacked_layers(layer_rngs):
            return Qwen2DecoderLayer(config, runtime, rngs=layer_rngs)

        self.layers = stacked_layers(rngs)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, runtime, rngs=rngs)

    def hidden_states(
        self,
        input_ids: jax.Array,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        cache: KVCache | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Final normed hidden states [batch, length, embed], and the updated cache if one is given."""
        if positions is None:
            positions = jnp.broadcast_to(
                jnp.arange(input_ids.shape[1], dtype=jnp.int32), input_ids.shape
            )
        if segment_ids is None:
            segment_ids = jnp.ones_like(input_ids, dtype=jnp.int32)
        config = self.config
        cos, sin = rotary_tables(positions, config.head_dim, config.rope_theta, config.rope_scaling)
        x = constrain(self.embed_tokens(input_ids), BATCH_LENGTH_EMBED)

        kv_shared = None
        layer_caches = None
        if cache is not None:
            index = cache.index
            cache = cache._replace(
                segment_ids=jax.lax.dynamic_update_slice(
                    cache.segment_ids, segment_ids, (0, index)
                ),
                positions=jax.lax.dynamic_update_slice(cache.positions, positions, (0, index)),
            )
            kv_shared = (cache.segment_ids, cache.positions, index)
            layer_caches = (cache.keys, cache.values)

        graphdef, layer_state = nnx.split(self.layers)

        def apply_layer(carry, scanned):
            state, kv = scanned
            layer = nnx.merge(graphdef, state)
            kv_cache = None if kv is None else (*kv, *kv_shared)
            carry, new_kv = layer(
                carry, cos, sin, segment_ids=segment_ids, positions=positions, kv_cache=kv_cache
            )
            return carry, new_kv

        if self.runtime.remat_policy != "none":
            apply_layer = jax.checkpoint(
                apply_layer, policy=_REMAT_POLICIES[self.runtime.remat_policy], prevent_cse=False
            )
        x, new_kv = jax.lax.scan(apply_layer, x, (layer_state, layer_caches))
        if cache is not None:
            cache = cache._replace(
                keys=new_kv[0], values=new_kv[1], index=cache.index + input_ids.shape[1]
            )
        return self.norm(x), cache


class Qwen2ForCausalLM(Qwen2Model):
    def __init__(self, config: QwenConfig, runtime: Runtime | None = None, *, rngs: nnx.Rngs):
        if config.num_labels is not None:
            raise ValueError(
                f"QwenConfig.num_labels={config.num_labels} describes a sequence classifier, "
                f"not a causal LM"
            )
        super().__init__(config, runtime, rngs=rngs)
        self.lm_head = (
            None if config.tie_word_embeddings else LMHead(config, self.runtime, rngs=rngs)
        )

    def output_kernel(self) -> jax.Array:
        """The [embed, vocab] matrix that turns hidden states into logits (tied or not)."""
        if self.lm_head is None:
            return self.embed_tokens.embedding[...].T
        return self.lm_head.kernel[...]

    def logits(self, hidden: jax.Array) -> jax.Array:
        dtype = self.runtime.compute_dtype
        out = jnp.einsum(
            "btd,dv->btv",
            hidden.astype(dtype),
            self.output_kernel().astype(dtype),
            preferred_element_type=jnp.float32,
        )
        return constrain(out, ("activation_batch", "activation_length", "activation_vocab"))

    def __call__(
        self,
        input_ids: jax.Array,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
    ) -> jax.Array:
        """Logits [batch, length, vocab] in float32."""
        hidden, _ = self.hidden_states(input_ids, positions, segment_ids)
        return self.logits(hidden)


class ScoreHead(nnx.Module):
    def __init__(self, config: QwenConfig, runtime: Runtime, *, rngs: nnx.Rngs):
        shape = (config.hidden_size, config.num_labels)
        # A handful of outputs: replicated.
        self.kernel = _normal_param(config, runtime, rngs, shape, ("embed", None))


def last_token_index(segment_ids: jax.Array) -> jax.Array:
    """[batch] index of each row's last non-padding token (segment id != 0), whichever side the
    padding is on; 0 for a row of padding only."""
    positions = jnp.arange(segment_ids.shape[-1], dtype=jnp.int32)
    return jnp.max(jnp.where(segment_ids != 0, positions, 0), axis=-1)


class Qwen2ForSequenceClassification(Qwen2Model):
    """transformers' `Qwen2ForSequenceClassification`: a bias-free `score` projection of the
    final hidden state at each row's last token (a reward model when num_labels is 1)."""

    def __init__(self, config: QwenConfig, runtime: Runtime | None = None, *, rngs: nnx.Rngs):
        if config.num_labels is None:
            raise ValueError("Qwen2ForSequenceClassification needs QwenConfig.num_labels")
        super().__init__(config, runtime, rngs=rngs)
        self.score = ScoreHead(config, self.runtime, rngs=rngs)

    def __call__(
        self,
        input_ids: jax.Array,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
    ) -> jax.Array:
        """Scores [batch, num_labels] in float32, read at each row's last non-padding token
        (segment id 0 marks padding; without segment ids, the last token)."""
        hidden, _ = self.hidden_states(input_ids, positions, segment_ids)
        if segment_ids is None:
            last = jnp.full(hidden.shape[:1], hidden.shape[1] - 1, jnp.int32)
        else:
            last = last_token_index(segment_ids)
        pooled = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
        dtype = self.runtime.compute_dtype
        return jnp.einsum(
            "bd,dl->bl",
            pooled.astype(dtype),
            self.score.kernel[...].astype(dtype),
            preferred_element_type=jnp.float32,
        )


def build_model(config: QwenConfig, runtime: Runtime | None = None, *, rngs: nnx.Rngs):
    """The model `config` describes: a classifier when it sets num_labels, else a causal LM."""
    if config.num_labels is None:
        return Qwen2ForCausalLM(config, runtime, rngs=rngs)
    return Qwen2ForSequenceClassification(config, runtime, rngs=rngs)


def abstract_module(
    factory: Callable[[], nnx.Module],
) -> tuple[nnx.GraphDef, nnx.State, nnx.Module]:
    """(graphdef, abstract parameter State, abstract module) of what `factory` builds: shapes,
    dtypes and logical names, with nothing allocated."""
    module = nnx.eval_shape(factory)
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    if rest:
        raise ValueError(
            f"the model has non-parameter state, which the trainer does not carry: "
            f"{jax.tree.map(lambda x: x.shape, rest)}"
        )
    return graphdef, params, module


def abstract_model(
    config: QwenConfig, runtime: Runtime | None = None
) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, abstract parameter State) of `build_model(config, runtime)`."""
    graphdef, params, _ = abstract_module(lambda: build_model(config, runtime, rngs=nnx.Rngs(0)))
    return graphdef, params
