"""The Qwen2 decoder layer in Flax NNX: pre-RMSNorm GQA attention and a pre-RMSNorm SwiGLU MLP.

Attribute names follow the Hugging Face checkpoint (`self_attn.q_proj`, `mlp.gate_proj`,
`input_layernorm`, ...) so that conversion is a table. Projection kernels keep heads as their own
dimension ([embed, heads, head_dim]) so that tensor parallelism splits whole heads.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from qwen_jax.kernels import registry as kernels
from qwen_jax.model.config import QwenConfig
from qwen_jax.model.rope import apply_rotary
from qwen_jax.parallel import logical
from qwen_jax.parallel.logical import constrain

BATCH_LENGTH_EMBED = ("activation_batch", "activation_length", "activation_embed")


@dataclasses.dataclass(frozen=True)
class Runtime:
    """How the architecture runs, as opposed to what it is: dtypes, remat, attention kernel.

    attention_impl: a name in `qwen_jax.kernels.registry`.
    attention_block_size: queries per block for implementations that block them
      (`sequence_sharded`); 0: one block.
    flash_block_sizes: (queries, keys) per block, or (queries, keys, scoped VMEM bytes), for the
      Pallas kernels (`pallas`, `splash`); empty: the table for the TPU generation.
    """

    dtype: str = "float32"
    param_dtype: str = "float32"
    remat_policy: str = "none"
    attention_impl: str = "xla"
    attention_block_size: int = 2048
    flash_block_sizes: tuple[int, ...] = ()

    def __post_init__(self):
        kernels.check(self.attention_impl)

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)


def make_param(
    rngs: nnx.Rngs, init, shape: Sequence[int], names: Sequence[str], dtype
) -> nnx.Param:
    # Logical names live in `out_sharding`; eager sharding is off because parameters are placed
    # by the jitted initializer's output shardings, never at construction.
    return nnx.Param(
        init(rngs.params(), tuple(shape), dtype), out_sharding=tuple(names), eager_sharding=False
    )


class RMSNorm(nnx.Module):
    def __init__(self, size: int, eps: float, runtime: Runtime, *, rngs: nnx.Rngs):
        self.eps = eps
        self.runtime = runtime
        self.scale = make_param(
            rngs, nnx.initializers.ones, (size,), ("norm",), runtime.param_dtype
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        # Statistics in float32 as transformers does, whatever the compute dtype.
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(self.runtime.compute_dtype) * normed.astype(
            self.runtime.compute_dtype
        )


class Qwen2Attention(nnx.Module):
    def __init__(self, config: QwenConfig, runtime: Runtime, *, rngs: nnx.Rngs):
        self.config = config
        self.runtime = runtime
        h, d = config.hidden_size, config.head_dim
        nq, nkv = config.num_attention_heads, config.num_key_value_heads
        normal = nnx.initializers.normal(config.initializer_range)
        dt = runtime.param_dtype

        def heads_in(heads: int, name: str) -> Projection:
            return Projection(
                rngs,
                normal,
                (h, heads, d),
                ("embed", name, "head_dim"),
                nnx.initializers.zeros,
                (name, "head_dim"),
                dt,
            )

        self.q_proj = heads_in(nq, "q_heads")
        self.k_proj = heads_in(nkv, "kv_heads")
        self.v_proj = heads_in(nkv, "kv_heads")
        self.o_proj = Projection(
            rngs, normal, (nq, d, h), ("q_heads", "head_dim", "embed"), None, None, dt, inputs=2
        )

    def __call__(self, x, cos, sin, *, segment_ids, positions, kv_cache=None):
        """x [b, t, embed]. With `kv_cache` = (keys, values, kv_segment_ids, kv_positions, index),
        the new keys and values are written at `index` and attention runs over the whole cache."""
        dtype = self.runtime.compute_dtype
        q = checkpoint_name(self.q_proj(x, dtype), "qkv_proj")
        k = checkpoint_name(self.k_proj(x, dtype), "qkv_proj")
        v = checkpoint_name(self.v_proj(x, dtype), "qkv_proj")
        q = constrain(q, ("activation_batch", "activation_length", "activation_heads", None))
        k = constrain(k, ("activation_batch", "activation_length", "activation_kv_heads", None))
        v = constrain(v, ("activation_batch", "activation_length", "activation_kv_heads", None))
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        kv_segment_ids, kv_positions, new_cache = segment_ids, positions, None
        if kv_cache is not None:
            cached_k, cached_v, kv_segment_ids, kv_positions, index = kv_cache
            k = jax.lax.dynamic_update_slice(cached_k, k.astype(cached_k.dtype), (0, index, 0, 0))
            v = jax.lax.dynamic_update_slice(cached_v, v.astype(cached_v.dtype), (0, index, 0, 0))
            new_cache = (k, v)
        mesh, rules = logical.active() or (None, None)
        attention = kernels.attention_fn(
            self.runtime.attention_impl,
            mesh=mesh,
            rules=rules,
            block_size=self.runtime.attention_block_size,
            flash_block_sizes=self.runtime.flash_block_sizes,
        )
        out = attention(
            q,
            k,
            v,
            q_segment_ids=segment_ids,
            kv_segment_ids=kv_segment_ids,
            q_positions=positions,
            kv_positions=kv_positions,
        )
        out = checkpoint_name(out, "attn_out")
        out = checkpoint_name(self.o_proj(out, dtype), "out_proj")
        return constrain(out, BATCH_LENGTH_EMBED), new_cache


class Projection(nnx.Module):
    """A kernel [inputs..., outputs...] with an optional bias, contracting the input's trailing
    `inputs` dims in the compute dtype: [b, t, inputs...] -> [b, t, outputs...]."""

    def __init__(
        self, rngs, kernel_init, shape, names, bias_init, bias_names, param_dtype, *, inputs=1
    ):
        self.kernel = make_param(rngs, kernel_init, shape, names, param_dtype)
        self.bias = (
            make_param(rngs, bias_init, shape[inputs:], bias_names, param_dtype)
            if bias_init is not None
            else None
        )

    def __call__(self, x, dtype) -> jax.Array:
        y = project(x.astype(dtype), self.kernel[...].astype(dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(dtype)
        return y


def _contract(x, kernel):
    inputs = tuple(range(x.ndim - 2))
    return _dot(x, kernel, ((tuple(d + 2 for d in inputs), inputs), ((), ()))).astype(x.dtype)


def _dot(a, b, dimensions):
    # A float32 result whatever the operands (rounded to theirs by the caller): TPU and GPU
    # matrix units accumulate in float32 anyway, and XLA's CPU backend runs bf16 x bf16 -> f32
    # products on the CPU's bf16 instructions (AVX-512 BF16) but not bf16 -> bf16 ones: the bf16
    # step 1.17x faster (docs/results.md, "Train step throughput on this CPU").
    return jax.lax.dot_general(a, b, dimensions, preferred_element_type=jnp.float32)


@jax.custom_vjp
def project(x, kernel):
    """x [b, t, inputs...] times kernel [inputs..., outputs...], with the usual gradients.

    The kernel's gradient sums x ⊗ g over tokens. Autodiff writes it as a product with g on the
    left, whose contracted token axis is then its major one, so XLA's CPU backend transposes g
    first; for the MLP's up-projections g is 2.75× the size of x. Here, in float32, the smaller
    operand is the one on the left (and so the one transposed): a copy of the narrower array
    instead of the wider. Every product has a float32 result, rounded to the operands' dtype.
    """
    return _contract(x, kernel)


def _project_fwd(x, kernel):
    return _contract(x, kernel), (x, kernel)


def _project_bwd(residuals, g):
    x, kernel = residuals
    inputs = x.ndim - 2
    outputs = tuple(range(inputs, kernel.ndim))
    d_x = _dot(g, kernel, ((tuple(range(2, g.ndim)), outputs), ((), ())))
    tokens = ((0, 1), (0, 1))
    # Narrower operand first in float32 only: with g first and bf16 operands, XLA's CPU backend
    # left the down projection's product to its generic dot, which has no bf16 x bf16 -> f32
    # form (UNIMPLEMENTED at run time); with x first it transposes x and fuses the product.
    if x.dtype != jnp.float32 or np.prod(x.shape[2:]) <= np.prod(g.shape[2:]):
        d_kernel = _dot(x, g, (tokens, ((), ())))
    else:
        transposed = _dot(g, x, (tokens, ((), ())))
        d_kernel = jnp.moveaxis(transposed, tuple(range(g.ndim - 2)), outputs)
    return d_x.astype(x.dtype), d_kernel.astype(kernel.dtype)


project.defvjp(_project_fwd, _project_bwd)


@jax.checkpoint
def _swiglu(gate, up):
    # Rematerialized so that the backward pass keeps only gate and up and recomputes the sigmoid,
    # rather than storing silu's intermediates: per layer that is two [tokens, intermediate]
    # arrays saved instead of four or more, and the elementwise recomputation is cheaper than the
    # memory traffic it replaces.
    return jax.nn.silu(gate) * up


class Qwen2MLP(nnx.Module):
    def __init__(self, config: QwenConfig, runtime: Runtime, *, rngs: nnx.Rngs):
        self.runtime = runtime
        h, m = config.hidden_size, config.intermediate_size
        normal = nnx.initializers.normal(config.initializer_range)
        dt = runtime.param_dtype
        self.gate_proj = Projection(rngs, normal, (h, m), ("embed", "mlp"), None, None, dt)
        self.up_proj = Projection(rngs, normal, (h, m), ("embed", "mlp"), None, None, dt)
        self.down_proj = Projection(rngs, normal, (m, h), ("mlp", "embed"), None, None, dt)

    def __call__(self, x):
        dtype = self.runtime.compute_dtype
        gate = checkpoint_name(self.gate_proj(x, dtype), "mlp_gate_up")
        up = checkpoint_name(self.up_proj(x, dtype), "mlp_gate_up")
        hidden = constrain(
            _swiglu(gate, up), ("activation_batch", "activation_length", "activation_mlp")
        )
        out = checkpoint_name(self.down_proj(hidden, dtype), "mlp_out")
        return constrain(out, BATCH_LENGTH_EMBED)


class Qwen2DecoderLayer(nnx.Module):
    def __init__(self, config: QwenConfig, runtime: Runtime, *, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, runtime, rngs=rngs)
        self.self_attn = Qwen2Attention(config, runtime, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(
            config.hidden_size, config.rms_norm_eps, runtime, rngs=rngs
        )
        self.mlp = Qwen2MLP(config, runtime, rngs=rngs)

    def __call__(self, x, cos, sin, *, segment_ids, positions, kv_cache=None):
        attn_out, new_cache = self.self_attn(
            self.input_layernorm(x),
            cos,
            sin,
            segment_ids=segment_ids,
            positions=positions,
            kv_cache=kv_cache,
        )
        x = x + attn_out
        x = x + self.mlp(self.post_attention_layernorm(x))
        return constrain(x, BATCH_LENGTH_EMBED), new_cache
