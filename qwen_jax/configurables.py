"""Everything gin can bind, registered in this one place, and the readers the entry points call.

The classes and functions below are plain code that imports no gin; registering them here under
their own module names keeps gin files readable (`config.QwenConfig.hidden_size = 896`,
`mesh.MeshConfig.fsdp = -1`, `tasks.SFTTask.seq_len = 4096`, `setup.RunConfig.init_from = ...`).
Calling the plain class never reads gin; only the registered versions here do, and only the entry
points call them, after `qwen_jax.cli.parse_gin`.
"""

from __future__ import annotations

import gin

from qwen_jax.checkpoint import manager
from qwen_jax.data import config as data_config
from qwen_jax.data.quality import dedup, heuristics, model_scores
from qwen_jax.data.quality import run as quality_run
from qwen_jax.eval import in_loop
from qwen_jax.model import config as model_config
from qwen_jax.model import generate, layers
from qwen_jax.parallel import mesh as mesh_lib
from qwen_jax.train import dpo, grpo, grpo_task, optimizer, reward_model, rewards, setup, tasks


def _register(module, *names):
    return [gin.external_configurable(getattr(module, n), module=module.__name__) for n in names]


QwenConfig, RopeScaling = _register(model_config, "QwenConfig", "RopeScaling")
(Runtime,) = _register(layers, "Runtime")
(Sampling,) = _register(generate, "Sampling")
MeshConfig, logical_rules = _register(mesh_lib, "MeshConfig", "logical_rules")
(CheckpointConfig,) = _register(manager, "CheckpointConfig")
_register(data_config, "Source", "DataStage")
_register(tasks, "PretrainTask", "SFTTask", "DPOTask")
_register(dpo, "DPOConfig")
_register(grpo_task, "GRPOTask")
_register(grpo, "GRPOConfig")
_register(rewards, "ExactMatch", "FormatMatch", "LengthPenalty")
_register(reward_model, "RewardModelTask", "RewardConfig", "RewardModelScore")
(make_optimizer,) = _register(optimizer, "make_optimizer")
_register(optimizer, "warmup_cosine", "warmup_stable_decay", "constant")
(RunConfig,) = _register(setup, "RunConfig")
_register(in_loop, "LmEvalConfig")
(QualityConfig,) = _register(quality_run, "QualityConfig")
_register(dedup, "ExactDedup", "NearDedup")
_register(heuristics, "GopherQuality", "GopherRepetition", "C4Rules")
_register(model_scores, "Perplexity", "QualityRating")


def binds(name: str) -> bool:
    try:
        gin.query_parameter(name)
        return True
    except ValueError:
        return False


def model_preset() -> model_config.QwenConfig | None:
    """The architecture a model preset (configs/models/) binds; None when none is bound."""
    return QwenConfig() if binds("config.QwenConfig.hidden_size") else None


def mesh_and_rules():
    """(mesh over all devices, logical rules), as the mesh gin files bind them."""
    return mesh_lib.make_mesh(MeshConfig()), logical_rules()


def train_setup() -> setup.TrainSetup:
    """The training run the parsed gin files describe."""
    mesh, rules = mesh_and_rules()
    tx, schedule = make_optimizer()
    return setup.resolve(
        RunConfig(),
        preset=model_preset(),
        runtime=Runtime(),
        mesh=mesh,
        rules=rules,
        optimizer=tx,
        schedule=schedule,
    )
