"""Hugging Face safetensors checkpoints <-> `Qwen2ForCausalLM` and
`Qwen2ForSequenceClassification` parameters.

The conversion is one table (`_RULES`): each model parameter, the HF tensor it comes from, and the
layout change between them. Import never materialises a whole parameter on the host: every device
shard is filled by `jax.make_array_from_callback` from memory-mapped slices of the HF tensors, so a
72B checkpoint loads onto a pod with host memory proportional to one shard. Export gathers one
layer of one tensor at a time and writes size-bounded shards plus the index transformers reads.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from typing import Callable, Iterator, Sequence

import jax
import ml_dtypes
import numpy as np
from flax import nnx
from flax import traverse_util
from jax.sharding import Mesh, Sharding
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from qwen_jax.data import tokenizer as tokenizer_lib
from qwen_jax.model.config import QwenConfig
from qwen_jax.model.layers import Runtime
from qwen_jax.model.transformer import Qwen2Model, abstract_model
from qwen_jax.parallel import host_data
from qwen_jax.parallel import mesh as mesh_lib
from qwen_jax.parallel.logical import LogicalRules

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Buffers that old transformers versions saved next to the weights; they carry no parameters.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclasses.dataclass(frozen=True)
class _Rule:
    """One parameter: its path in the NNX state, its HF name ({i} = layer) and layout kind.

    Layout kinds, HF layout -> ours (per layer):
      copy:       same shape.
      transpose:  [out, in] -> [in, out] (torch Linear stores the transpose of our kernel).
      heads_in:   [heads*head_dim, embed] -> [embed, heads, head_dim] (q/k/v kernels).
      heads_bias: [heads*head_dim] -> [heads, head_dim].
      heads_out:  [embed, heads*head_dim] -> [heads, head_dim, embed] (o_proj).
    """

    path: tuple[str, ...]
    hf_name: str
    kind: str

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf_name


def _rules(config: QwenConfig) -> list[_Rule]:
    layer = "model.layers.{i}."
    rules = [
        _Rule(("embed_tokens", "embedding"), "model.embed_tokens.weight", "copy"),
        _Rule(("norm", "scale"), "model.norm.weight", "copy"),
        _Rule(("layers", "input_layernorm", "scale"), layer + "input_layernorm.weight", "copy"),
        _Rule(
            ("layers", "post_attention_layernorm", "scale"),
            layer + "post_attention_layernorm.weight",
            "copy",
        ),
        _Rule(
            ("layers", "self_attn", "o_proj", "kernel"),
            layer + "self_attn.o_proj.weight",
            "heads_out",
        ),
    ]
    for proj in ("q_proj", "k_proj", "v_proj"):
        rules.append(
            _Rule(
                ("layers", "self_attn", proj, "kernel"),
                layer + f"self_attn.{proj}.weight",
                "heads_in",
            )
        )
        rules.append(
            _Rule(
                ("layers", "self_attn", proj, "bias"),
                layer + f"self_attn.{proj}.bias",
                "heads_bias",
            )
        )
    for proj in ("gate_proj", "up_proj", "down_proj"):
        rules.append(
            _Rule(("layers", "mlp", proj, "kernel"), layer + f"mlp.{proj}.weight", "transpose")
        )
    if config.num_labels is not None:
        rules.append(_Rule(("score", "kernel"), "score.weight", "transpose"))
    elif not config.tie_word_embeddings:
        rules.append(_Rule(("lm_head", "kernel"), "lm_head.weight", "transpose"))
    return rules


def _to_hf(kind: str, x: np.ndarray) -> np.ndarray:
    """One layer of our parameter -> the HF tensor."""
    if kind == "copy":
        return x
    if kind == "transpose":
        return x.T
    if kind == "heads_in":
        return x.reshape(x.shape[0], -1).T
    if kind == "heads_bias":
        return x.reshape(-1)
    if kind == "heads_out":
        return x.reshape(-1, x.shape[-1]).T
    raise AssertionError(kind)


def _hf_shape(kind: str, shape: Sequence[int]) -> tuple[int, ...]:
    """The HF shape of one layer of a parameter with our `shape`."""
    if kind == "copy":
        return tuple(shape)
    if kind == "transpose":
        return tuple(shape[::-1])
    if kind == "heads_in":
        return (shape[1] * shape[2], shape[0])
    if kind == "heads_bias":
        return (shape[0] * shape[1],)
    if kind == "heads_out":
        return (shape[2], shape[0] * shape[1])
    raise AssertionError(kind)


def _read_slice(kind: str, tensor, index: tuple[slice, ...], head_dim: int) -> np.ndarray:
    """Our-layout block `index` of one layer, reading only the HF rows/columns it covers.

    `tensor` is a safetensors slice handle (indexable without loading the whole tensor). Heads are
    contiguous runs of `head_dim` rows in HF's fused [heads*head_dim] axis, so a block of heads is
    one contiguous range there; a block within head_dim is cut after reshaping.
    """
    if kind == "copy":
        return tensor[index]
    if kind == "transpose":
        return tensor[index[::-1]].T
    if kind == "heads_in":
        embed, heads, dims = index
        rows = slice(heads.start * head_dim, heads.stop * head_dim)
        block = tensor[rows, embed].T
        return block.reshape(block.shape[0], -1, head_dim)[:, :, dims]
    if kind == "heads_bias":
        heads, dims = index
        block = tensor[heads.start * head_dim : heads.stop * head_dim]
        return block.reshape(-1, head_dim)[:, dims]
    if kind == "heads_out":
        heads, dims, embed = index
        block = tensor[embed, heads.start * head_dim : heads.stop * head_dim].T
        return block.reshape(-1, head_dim, block.shape[-1])[:, dims, :]
    raise AssertionError(kind)


def _bounded(index: tuple[slice, ...], shape: Sequence[int]) -> tuple[slice, ...]:
    return tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, shape))


def _open_safetensors(path: str):
    try:
        return safe_open(path, "np")
    except SafetensorError as e:
        raise ValueError(f"{path}: corrupt safetensors file ({e})") from None


class HFCheckpoint:
    """A directory with `config.json` and one or more `.safetensors` files, opened lazily."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = os.fspath(directory)
        config_path = os.path.join(self.directory, "config.json")
        if not os.path.exists(config_path):
            raise FileNotFoundError(f"{config_path}: no config.json; not a Hugging Face checkpoint")
        with open(config_path) as f:
            self.config = QwenConfig.from_hf_config(json.load(f), source=config_path)
        index_path = os.path.join(self.directory, INDEX_FILE)
        if os.path.exists(index_path):
            with open(index_path) as f:
                weight_map = json.load(f).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index_path}: no 'weight_map' object")
        elif os.path.exists(os.path.join(self.directory, SINGLE_FILE)):
            weight_map = {
                name: SINGLE_FILE
                for name in _open_safetensors(os.path.join(self.directory, SINGLE_FILE)).keys()
            }
        else:
            raise FileNotFoundError(f"{self.directory}: neither {INDEX_FILE} nor {SINGLE_FILE}")
        self.weight_map: dict[str, str] = {
            name: file for name, file in weight_map.items() if not name.endswith(_IGNORED_SUFFIXES)
        }
        self._handles: dict[str, object] = {}

    def _file(self, name: str):
        file = self.weight_map[name]
        if file not in self._handles:
            path = os.path.join(self.directory, file)
            if not os.path.exists(path):
                raise FileNotFoundError(f"{path}: listed in {INDEX_FILE} for {name!r} but missing")
            self._handles[file] = _open_safetensors(path)
        return self._handles[file]

    def tensor(self, name: str):
        """A lazily read slice handle: `.get_shape()`, and indexing reads only that block."""
        return self._file(name).get_slice(name)

    def validate(self, config: QwenConfig) -> None:
        """Every tensor present with the right shape, and no tensor left unused."""
        expected = {}
        for rule, shape in _rule_shapes(config):
            for i in range(config.num_hidden_layers if rule.per_layer else 1):
                expected[rule.hf_name.format(i=i)] = _hf_shape(rule.kind, shape)
        missing = sorted(set(expected) - set(self.weight_map))
        if missing:
            raise ValueError(
                f"{self.directory}: missing tensors {missing[:5]}"
                f"{' ...' if len(missing) > 5 else ''} ({len(missing)} in all)"
            )
        # Tied checkpoints sometimes also store lm_head.weight (a copy of the embedding); it is
        # redundant, not wrong.
        redundant = config.tie_word_embeddings and config.num_labels is None
        unused = sorted(
            set(self.weight_map) - set(expected) - ({"lm_head.weight"} if redundant else set())
        )
        if unused:
            raise ValueError(
                f"{self.directory}: tensors with no place in {config.architecture}: "
                f"{unused[:5]} ({len(unused)} in all)"
            )
        for name, shape in expected.items():
            actual = tuple(self.tensor(name).get_shape())
            if actual != shape:
                raise ValueError(
                    f"{os.path.join(self.directory, self.weight_map[name])}: tensor "
                    f"{name!r} has shape {actual}, config.json implies {shape}"
                )


def _rule_shapes(config: QwenConfig) -> Iterator[tuple[_Rule, tuple[int, ...]]]:
    """Each rule with the per-layer shape of its parameter, from the abstract model."""
    _, state = abstract_model(config)
    shapes = {path: variable.get_value().shape for path, variable in nnx.to_flat_state(state)}
    for rule in _rules(config):
        shape = shapes[rule.path]
        yield rule, tuple(shape[1:] if rule.per_layer else shape)


def load_model(
    directory: str | os.PathLike,
    runtime: Runtime | None = None,
    *,
    mesh: Mesh | None = None,
    rules: LogicalRules | None = None,
    config: QwenConfig | None = None,
) -> Qwen2Model:
    """Builds the checkpoint's model (`transformer.build_model`), parameters in
    `runtime.param_dtype`.

    With `mesh` and `rules`, every parameter is created sharded by its logical names; each process
    reads only the slices its own devices hold. Without them, parameters go to the default device.
    `config`, when given, must equal the checkpoint's (a guard for launchers that also set it in gin).
    """
    checkpoint = HFCheckpoint(directory)
    if config is not None and config != checkpoint.config:
        raise ValueError(
            f"{checkpoint.directory}/config.json describes {checkpoint.config}, "
            f"which differs from the requested {config}"
        )
    config = checkpoint.config
    checkpoint.validate(config)
    if (mesh is None) != (rules is None):
        raise ValueError("load_model: give both mesh and rules, or neither")
    runtime = runtime or Runtime()
    graphdef, state = abstract_model(config, runtime)
    flat = nnx.to_flat_state(state)
    default_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = (
        None
        if mesh is None
        else traverse_util.flatten_dict(mesh_lib.param_shardings(state, mesh, rules))
    )
    by_path = {rule.path: rule for rule in _rules(config)}
    dtype = np.dtype(runtime.param_dtype)
    for path, variable in flat:
        rule = by_path[path]
        target = variable.get_value()
        sharding: Sharding = default_device if shardings is None else shardings[path]
        variable.set_value(
            _load_array(
                checkpoint,
                rule,
                target.shape,
                dtype,
                sharding,
                config.head_dim,
                config.num_hidden_layers,
            )
        )
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _load_array(
    checkpoint: HFCheckpoint,
    rule: _Rule,
    shape,
    dtype,
    sharding: Sharding,
    head_dim: int,
    num_layers: int,
) -> jax.Array:
    def block(index: tuple[slice, ...]) -> np.ndarray:
        index = _bounded(index, shape)
        if not rule.per_layer:
            return _read_slice(rule.kind, checkpoint.tensor(rule.hf_name), index, head_dim).astype(
                dtype
            )
        layers = range(num_layers)[index[0]]
        return np.stack(
            [
                _read_slice(
                    rule.kind, checkpoint.tensor(rule.hf_name.format(i=i)), index[1:], head_dim
                ).astype(dtype)
                for i in layers
            ]
        )

    return jax.make_array_from_callback(tuple(shape), sharding, block)


def hf_tensors(
    model: Qwen2Model, dtype: str | None = None
) -> Iterator[tuple[str, Callable[[], np.ndarray]]]:
    """(HF name, thunk producing the host array) for every tensor, one layer gathered at a time."""
    config = model.config
    params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    for rule in _rules(config):
        array = params[rule.path].get_value()
        layers = range(config.num_hidden_layers) if rule.per_layer else [None]
        for i in layers:

            def thunk(array=array, i=i, kind=rule.kind):
                host = host_data.to_host(array if i is None else array[i])
                host = _to_hf(kind, host)
                return np.ascontiguousarray(
                    host.astype(_numpy_dtype(dtype) if dtype else host.dtype)
                )

            yield rule.hf_name.format(i=i), thunk


QWEN_STOP_IDS = (151_645, 151_643)  # <|im_end|>, <|endoftext|>
GENERATION_CONFIG = "generation_config.json"


def _numpy_dtype(name: str) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def save_model(
    model: Qwen2Model,
    directory: str | os.PathLike,
    *,
    dtype: str = "bfloat16",
    max_shard_bytes: int = 5 * 2**30,
    generation_config: dict | None = None,
    tokenizer_dir: str | os.PathLike | None = None,
) -> None:
    """Writes an HF checkpoint transformers' `from_pretrained` reads; all or nothing.

    The tokenizer files found in `tokenizer_dir` are copied along. generation_config.json is the
    one in `tokenizer_dir` when there is one (an imported checkpoint's own), else stops at the
    tokenizer's `<|im_end|>` and `<|endoftext|>` (Qwen2.5's 151645 and 151643 without a
    tokenizer); `generation_config` entries override it.

    Files are written into a temporary sibling directory that replaces `directory` only once
    complete, so an interrupted export never leaves a half-written checkpoint behind.
    """
    directory = os.path.abspath(os.fspath(directory))
    if os.path.exists(directory) and os.listdir(directory):
        raise FileExistsError(f"{directory}: exists and is not empty; refusing to overwrite")
    if jax.process_index() != 0:
        # Other processes of a multi-process run take part in each tensor's gather; process 0
        # writes.
        for _, thunk in hf_tensors(model, dtype):
            thunk()
        _sync("save_model")
        return
    _write(model, directory, dtype, max_shard_bytes, generation_config, tokenizer_dir)
    _sync("save_model")


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _write(model, directory, dtype, max_shard_bytes, generation_config, tokenizer_dir) -> None:
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".export-", dir=parent)
    try:
        weight_map: dict[str, int] = {}
        shard: dict[str, np.ndarray] = {}
        count = size = total = 0
        for name, thunk in hf_tensors(model, dtype):
            tensor = thunk()
            if shard and size + tensor.nbytes > max_shard_bytes:
                count += 1
                _write_shard(staging, count, shard)
                shard, size = {}, 0
            shard[name] = tensor
            size += tensor.nbytes
            total += tensor.nbytes
            weight_map[name] = count + 1
        count += 1
        _write_shard(staging, count, shard)
        names = {k: f"model-{k:05d}-of-{count:05d}.safetensors" for k in range(1, count + 1)}
        for k, file in names.items():
            os.rename(os.path.join(staging, f"shard-{k}"), os.path.join(staging, file))
        with open(os.path.join(staging, INDEX_FILE), "w") as f:
            json.dump(
                {
                    "metadata": {"total_size": total},
                    "weight_map": {n: names[k] for n, k in sorted(weight_map.items())},
                },
                f,
                indent=2,
            )
        if tokenizer_dir is not None and not tokenizer_lib.copy_files(
            os.fspath(tokenizer_dir), staging
        ):
            raise FileNotFoundError(f"{tokenizer_dir}: none of {tokenizer_lib.FILES}")
        hf_config = model.config.to_hf_config()
        hf_config["torch_dtype"] = dtype
        if model.config.num_labels is not None and model.config.pad_token_id is None:
            # transformers' classifier refuses batches of more than one row without it.
            hf_config["pad_token_id"] = _tokenizer_ids(staging)[2]
        with open(os.path.join(staging, "config.json"), "w") as f:
            json.dump(hf_config, f, indent=2)
        generation = {
            **_default_generation_config(model.config, staging),
            **(generation_config or {}),
        }
        with open(os.path.join(staging, GENERATION_CONFIG), "w") as f:
            json.dump(generation, f, indent=2)
        _public(staging)
        if os.path.exists(directory):
            os.rmdir(directory)  # empty, checked above
        os.rename(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _public(directory: str) -> None:
    """Gives `directory` and its files the modes the umask gives new ones: mkdtemp makes the
    directory private (0700) and safetensors writes its files 0600, and both modes would survive
    the rename, so a serving container or another user could not read the export."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for name in os.listdir(directory):
        os.chmod(os.path.join(directory, name), 0o666 & ~umask)


def _default_generation_config(config: QwenConfig, directory: str) -> dict:
    """generation_config.json found in `directory`, else one stopping at its tokenizer's (or
    Qwen2.5's) `<|im_end|>` and `<|endoftext|>`."""
    path = os.path.join(directory, GENERATION_CONFIG)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    im_end, eos, _ = _tokenizer_ids(directory)
    return {"bos_token_id": config.bos_token_id, "eos_token_id": [im_end, eos]}


def _tokenizer_ids(directory: str) -> tuple[int, int, int]:
    """(`<|im_end|>`, `<|endoftext|>`, padding) ids of the tokenizer in `directory`, else
    Qwen2.5's (which pads with `<|endoftext|>`)."""
    path = os.path.join(directory, tokenizer_lib.TOKENIZER_JSON)
    if not os.path.exists(path):
        return (*QWEN_STOP_IDS, QWEN_STOP_IDS[1])
    tokenizer = tokenizer_lib.Tokenizer.from_file(path)
    return tokenizer.im_end_id, tokenizer.eos_id, tokenizer.pad_id


def _write_shard(directory: str, number: int, tensors: dict[str, np.ndarray]) -> None:
    # transformers requires the "format" metadata to pick the right loader.
    save_file(tensors, os.path.join(directory, f"shard-{number}"), metadata={"format": "pt"})
