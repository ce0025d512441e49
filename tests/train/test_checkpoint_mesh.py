"""A training checkpoint saved on 8 devices restores onto a 4-device mesh, values intact."""

import jax
import numpy as np
import optax
from flax import nnx

from qwen_jax.checkpoint.manager import CheckpointConfig, TrainCheckpointer
from qwen_jax.model.config import QwenConfig
from qwen_jax.model.transformer import Qwen2ForCausalLM
from qwen_jax.parallel import mesh as mesh_lib
from qwen_jax.train.state import create_train_state

RULES = (
    ("layers", None),
    ("vocab", None),
    ("embed", "fsdp"),
    ("q_heads", None),
    ("kv_heads", None),
    ("head_dim", None),
    ("mlp", None),
    ("norm", None),
)
CONFIG = QwenConfig(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=96,
)


def _state(devices, seed):
    mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(fsdp=-1), devices=devices)
    state, _, shardings = create_train_state(
        lambda: Qwen2ForCausalLM(CONFIG, rngs=nnx.Rngs(seed)), optax.adam(1e-3), mesh, RULES
    )
    return state


def test_restore_onto_a_smaller_mesh(tmp_path):
    assert len(jax.devices()) == 8
    saved = _state(jax.devices(), seed=0)
    checkpointer = TrainCheckpointer(str(tmp_path), CheckpointConfig(every_steps=1))
    checkpointer.save(
        5,
        params=saved.params,
        opt_state=saved.opt_state,
        frozen=None,
        model_config=CONFIG.to_hf_config(),
        meta={"step": 5},
        data_state={},
    )
    checkpointer.close()

    target = _state(jax.devices()[:4], seed=1)  # other values, 4-device shardings
    restored = TrainCheckpointer(str(tmp_path), CheckpointConfig()).restore(
        5, params=target.params, opt_state=target.opt_state, frozen=None
    )
    for path, value in jax.tree_util.tree_leaves_with_path(restored["params"]):
        assert len(value.sharding.device_set) == 4, path
    leaves = jax.tree_util.tree_leaves
    for a, b in zip(leaves(saved.params), leaves(restored["params"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    embed = restored["params"]["embed_tokens"]["embedding"]
    assert embed.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
    assert restored["train_meta"] == {"step": 5}
