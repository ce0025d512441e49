"""What a model preset is, without allocating it: sizes, parameter tensors and memory.

  python -m qwen_jax.model_info --gin_file=configs/models/qwen2_5_7b.gin \
      [--gin_file=configs/models/yarn_128k.gin] [--gin_param=Runtime.param_dtype='bfloat16'] \
      [--seq_len=4096] [--tensors]

Prints one JSON object. The parameter count is computed twice, by the closed form
(`config.parameter_count`) and by summing the abstract model's tensors (`nnx.eval_shape`, nothing
allocated), and the program fails if they differ.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import numpy as np
from absl import app, flags
from flax import nnx

from qwen_jax import cli
from qwen_jax.model.config import QwenConfig, parameter_count
from qwen_jax.model.layers import Runtime
from qwen_jax.model.transformer import abstract_model

_SEQ_LEN = flags.DEFINE_integer("seq_len", 4096, "sequence length for the KV-cache figure")
_TENSORS = flags.DEFINE_boolean("tensors", False, "also list every parameter tensor")

# Bytes per parameter of mixed-precision AdamW training: float32 master weights, two float32
# moments and a gradient in the parameter dtype.
_ADAM_STATE_BYTES = 4 + 4 + 4


def describe(
    config: QwenConfig, runtime: Runtime, seq_len: int, tensors: bool = False
) -> dict[str, Any]:
    flat = nnx.to_flat_state(abstract_model(config, runtime)[1])
    counted = sum(int(np.prod(v.get_value().shape)) for _, v in flat)
    closed_form = parameter_count(config)
    if counted != closed_form:
        raise AssertionError(f"parameter_count(config)={closed_form} but the model has {counted}")
    embedding = config.vocab_size * config.hidden_size
    embeddings = embedding * (1 if config.tie_word_embeddings else 2)
    param_bytes = np.dtype(runtime.param_dtype).itemsize
    compute_bytes = np.dtype(runtime.dtype).itemsize
    kv_per_token = (
        2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * compute_bytes
    )
    info: dict[str, Any] = {
        "config": config.to_hf_config(),
        "runtime": {"dtype": runtime.dtype, "param_dtype": runtime.param_dtype},
        "parameters": counted,
        "embedding_parameters": embeddings,
        "non_embedding_parameters": counted - embeddings,
        "parameters_per_layer": (counted - embeddings - config.hidden_size)
        // config.num_hidden_layers,
        "parameter_bytes": counted * param_bytes,
        "adamw_training_state_bytes": counted * (_ADAM_STATE_BYTES + param_bytes),
        "kv_cache_bytes_per_token": kv_per_token,
        "kv_cache_bytes_per_sequence": kv_per_token * seq_len,
        "seq_len": seq_len,
    }
    if tensors:
        info["tensors"] = {
            ".".join(map(str, path)): {
                "shape": list(v.get_value().shape),
                "logical_axes": list(v.get_metadata()["out_sharding"]),
            }
            for path, v in flat
        }
    return info


def main() -> None:
    from qwen_jax import configurables

    cli.parse_gin(cli.GIN_FILE.value, cli.GIN_PARAM.value)
    # Without a model preset, QwenConfig's required values are unbound: one error line.
    info = describe(
        configurables.QwenConfig(), configurables.Runtime(), _SEQ_LEN.value, _TENSORS.value
    )
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(cli.run(main, argv)))
