"""The model checkpoint: what `import_hf` writes, `export` reads, and training starts from.

A model checkpoint is an Orbax composite directory with two items:
  params/        the parameters as a pure dict (`nnx.to_pure_dict`), OCDBT + Zarr arrays;
  model_config/  `QwenConfig.to_hf_config()` as JSON, so the architecture travels with the weights;
  tokenizer/     (when known) the Hugging Face tokenizer files, chat template and generation
                 config, so the vocabulary travels with the weights too (`tokenizer_dir`).
A step directory of `qwen_jax.checkpoint.manager.TrainCheckpointer` holds the same two items
(plus the optimizer and data state), so anything that reads a model checkpoint also reads a
training step; a step's tokenizer is its run's `<workdir>/tokenizer/`. A model checkpoint is
written into a staging directory and renamed into place once complete.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding

from qwen_jax.data import tokenizer as tokenizer_lib
from qwen_jax.model.config import QwenConfig
from qwen_jax.model.layers import Runtime
from qwen_jax.model.transformer import Qwen2Model, abstract_model
from qwen_jax.parallel import mesh as mesh_lib
from qwen_jax.parallel.logical import LogicalRules

PARAMS, MODEL_CONFIG = "params", "model_config"  # the item names TrainCheckpointer uses too
TOKENIZER = "tokenizer"  # beside the items of a model checkpoint, or in a training run's workdir


def _checkpointer() -> ocp.Checkpointer:
    return ocp.Checkpointer(ocp.CompositeCheckpointHandler())


def _check_directory(directory: str) -> str:
    directory = os.path.abspath(os.fspath(directory))
    for item in (PARAMS, MODEL_CONFIG):
        if not os.path.isdir(os.path.join(directory, item)):
            raise FileNotFoundError(
                f"{directory}: no '{item}' item; not a model checkpoint "
                f"(import_hf's output or a training step directory)"
            )
    return directory


def save_model_checkpoint(
    directory: str | os.PathLike,
    params: Any,
    config: QwenConfig,
    tokenizer_from: str | os.PathLike | None = None,
) -> None:
    """Writes `params` (a pure dict, possibly sharded across processes), `config` and the
    tokenizer files found in the directory `tokenizer_from`; all or nothing."""
    directory = os.path.abspath(os.fspath(directory))
    if os.path.exists(directory):
        raise FileExistsError(f"{directory}: already exists; refusing to overwrite")
    staging = os.path.join(os.path.dirname(directory), f".{os.path.basename(directory)}.partial")
    if jax.process_index() == 0:
        shutil.rmtree(staging, ignore_errors=True)  # left by an interrupted save
    try:
        _checkpointer().save(
            staging,
            args=ocp.args.Composite(
                **{
                    PARAMS: ocp.args.StandardSave(params),
                    MODEL_CONFIG: ocp.args.JsonSave(config.to_hf_config()),
                }
            ),
        )
        if jax.process_index() == 0:
            if tokenizer_from is not None:
                tokenizer_lib.copy_files(
                    os.fspath(tokenizer_from), os.path.join(staging, TOKENIZER)
                )
            os.rename(staging, directory)
    except BaseException:
        if jax.process_index() == 0:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("save_model_checkpoint")


def tokenizer_dir(directory: str | os.PathLike) -> str | None:
    """The tokenizer that travels with a model checkpoint: its own `tokenizer/`, or for a
    training step (`<workdir>/checkpoints/<step>`) its run's `<workdir>/tokenizer/`; None when
    there is none."""
    directory = os.path.abspath(os.fspath(directory))
    candidates = [os.path.join(directory, TOKENIZER)]
    parent = os.path.dirname(directory)
    if os.path.basename(parent) == "checkpoints":
        candidates.append(os.path.join(os.path.dirname(parent), TOKENIZER))
    for candidate in candidates:
        if os.path.isfile(os.path.join(candidate, tokenizer_lib.TOKENIZER_JSON)):
            return candidate
    return None


def read_model_config(directory: str | os.PathLike) -> QwenConfig:
    directory = _check_directory(directory)
    restored = _checkpointer().restore(
        directory, args=ocp.args.Composite(**{MODEL_CONFIG: ocp.args.JsonRestore()})
    )
    return QwenConfig.from_hf_config(
        restored[MODEL_CONFIG], source=os.path.join(directory, MODEL_CONFIG)
    )


def load_model_checkpoint(
    directory: str | os.PathLike, shardings: Any = None, dtype: str = "float32"
) -> tuple[QwenConfig, Any]:
    """(config, params as a pure dict) restored with `shardings` (a matching pure dict of
    shardings; default: the first device) in `dtype`.

    The stored arrays are cast on restore, so a bfloat16 import feeds float32 master weights.
    """
    directory = _check_directory(directory)
    config = read_model_config(directory)
    _, state = abstract_model(config, Runtime(param_dtype=dtype))
    shapes = nnx.to_pure_dict(state)
    if shardings is None:
        device = SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: device, shapes)
    try:
        target = jax.tree.map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
        )
    except ValueError as e:
        raise ValueError(
            f"{directory}: the given shardings do not match the parameters of {config}: {e}"
        ) from None
    try:
        restored = _checkpointer().restore(
            directory, args=ocp.args.Composite(**{PARAMS: ocp.args.StandardRestore(target)})
        )
    except (ValueError, KeyError) as e:
        raise ValueError(
            f"{directory}/{PARAMS}: does not match the architecture in its {MODEL_CONFIG}: {e}"
        ) from None
    return config, restored[PARAMS]


_HEADS = ("lm_head", "score")  # the parameters that differ between the decoder's heads


def load_decoder(directory: str | os.PathLike, params: Any, shardings: Any, dtype: str) -> Any:
    """`params` (a pure dict) with every decoder parameter read from the checkpoint at
    `directory`, whose head may differ: as transformers' `from_pretrained` builds a classifier
    from a causal LM, the checkpoint's head is not read and `params`' own head is kept as it is
    (freshly initialized). `shardings` matches `params`."""
    directory = _check_directory(directory)
    target = {
        name: jax.tree.map(
            lambda x, sharding: jax.ShapeDtypeStruct(x.shape, dtype, sharding=sharding),
            value,
            shardings[name],
        )
        for name, value in params.items()
        if name not in _HEADS
    }
    try:
        restored = _checkpointer().restore(
            directory,
            args=ocp.args.Composite(
                **{
                    PARAMS: ocp.args.PyTreeRestore(
                        item=target,
                        restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                        partial_restore=True,
                    )
                }
            ),
        )
    except (ValueError, KeyError) as e:
        raise ValueError(
            f"{directory}/{PARAMS}: its decoder does not match the model's: {e}"
        ) from None
    return {**params, **restored[PARAMS]}


def load_model(
    directory: str | os.PathLike,
    runtime: Runtime | None = None,
    *,
    mesh: Mesh | None = None,
    rules: LogicalRules | None = None,
) -> Qwen2Model:
    """The model of a checkpoint, parameters in `runtime.param_dtype`, sharded when given a
    mesh and logical rules."""
    directory = os.fspath(directory)
    runtime = runtime or Runtime()
    graphdef, state = abstract_model(read_model_config(directory), runtime)
    shardings = None
    if mesh is not None:
        if rules is None:
            raise ValueError("load_model: a mesh needs its logical rules")
        shardings = mesh_lib.param_shardings(state, mesh, rules)
    _, params = load_model_checkpoint(directory, shardings, runtime.param_dtype)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def model_params(model: Qwen2Model) -> Any:
    """The pure dict `save_model_checkpoint` takes."""
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))
