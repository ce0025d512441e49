"""HF safetensors import/export against transformers' own `save_pretrained`/`from_pretrained`."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from jax.sharding import Mesh

from conftest import hf_model, left_padded_batch, tiny_config
from qwen_jax.convert import hf
from qwen_jax.model.generate import prompt_positions
from qwen_jax.model.layers import Runtime

# Every logical axis of the model sharded on a 4x2 mesh. head_dim takes "data" wherever embed has
# not already, so biases and o_proj are also cut inside a head: every partial-read branch runs.
RULES = [
    ("vocab", "model"),
    ("embed", "data"),
    ("q_heads", "model"),
    ("kv_heads", "model"),
    ("head_dim", "data"),
    ("mlp", "model"),
    ("layers", None),
    ("norm", "model"),
]


def test_import_matches_transformers_logits(hf_checkpoint):
    config, reference, directory = hf_checkpoint
    ids, mask = left_padded_batch(config.vocab_size)
    with torch.no_grad():
        expected = reference(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    model = hf.load_model(directory)
    assert model.config == config
    logits = np.asarray(model(jnp.asarray(ids), prompt_positions(mask), jnp.asarray(mask)))
    real = mask.astype(bool)
    np.testing.assert_allclose(logits[real], expected[real], rtol=0, atol=1e-5)


def test_sharded_import_places_the_same_values(hf_checkpoint):
    _, _, directory = hf_checkpoint
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
    single = nnx.to_flat_state(nnx.state(hf.load_model(directory), nnx.Param))
    sharded = dict(
        nnx.to_flat_state(nnx.state(hf.load_model(directory, mesh=mesh, rules=RULES), nnx.Param))
    )
    specs = set()
    for path, variable in single:
        array = sharded[path].get_value()
        specs.add(array.sharding.spec)
        assert array.sharding.mesh == mesh, path
        np.testing.assert_array_equal(
            np.asarray(array), np.asarray(variable.get_value()), err_msg=str(path)
        )
    assert len(specs) > 5  # the rules really split the parameters many ways


def test_bfloat16_parameters(hf_checkpoint):
    config, reference, directory = hf_checkpoint
    model = hf.load_model(directory, Runtime(param_dtype="bfloat16"))
    embedding = model.embed_tokens.embedding.get_value()
    assert embedding.dtype == jnp.bfloat16
    expected = reference.model.embed_tokens.weight.detach().to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(np.asarray(embedding, np.float32), expected)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_export_round_trips_through_transformers(hf_checkpoint, tmp_path, dtype):
    config, reference, directory = hf_checkpoint
    out = tmp_path / "export"
    hf.save_model(hf.load_model(directory), out, dtype=dtype, max_shard_bytes=50_000)
    index = json.loads((out / hf.INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 1  # really sharded
    loaded = transformers.Qwen2ForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert loaded.config.tie_word_embeddings == config.tie_word_embeddings
    stored = hf.HFCheckpoint(out).tensor("model.embed_tokens.weight").get_dtype()
    assert stored == {"float32": "F32", "bfloat16": "BF16"}[dtype]
    want, got = reference.state_dict(), loaded.state_dict()
    assert set(want) == set(got)
    cast = (lambda t: t.to(torch.bfloat16).float()) if dtype == "bfloat16" else (lambda t: t)
    for name in want:
        torch.testing.assert_close(got[name], cast(want[name]), rtol=0, atol=0, msg=name)


def test_export_refuses_to_overwrite(hf_checkpoint, tmp_path):
    _, _, directory = hf_checkpoint
    out = tmp_path / "export"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="not empty"):
        hf.save_model(hf.load_model(directory), out)
    assert os.listdir(out) == ["keep.txt"]


@pytest.fixture
def small_checkpoint(tmp_path):
    config = tiny_config(num_hidden_layers=1)
    hf_model(config).save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def _edit_tensors(directory, edit):
    from safetensors.numpy import load_file, save_file

    path = directory / hf.SINGLE_FILE
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_tied_checkpoint_may_also_store_lm_head(tmp_path):
    """Some tied checkpoints store the output matrix as well; it is the embedding, so it is
    accepted and ignored rather than reported as unknown."""
    config = tiny_config(num_hidden_layers=1, tie_word_embeddings=True)
    reference = hf_model(config)
    reference.save_pretrained(tmp_path / "hf")
    _edit_tensors(
        tmp_path / "hf",
        lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].copy()}),
    )
    model = hf.load_model(tmp_path / "hf")
    assert model.lm_head is None
    np.testing.assert_array_equal(
        np.asarray(model.output_kernel()), reference.lm_head.weight.detach().numpy().T
    )


def test_missing_tensor_is_named(small_checkpoint):
    _edit_tensors(small_checkpoint, lambda t: t.pop("model.layers.0.self_attn.k_proj.bias"))
    with pytest.raises(
        ValueError, match=r"missing tensors \['model.layers.0.self_attn.k_proj.bias'\]"
    ):
        hf.load_model(small_checkpoint)


def test_wrong_shape_is_named(small_checkpoint):
    def edit(t):
        t["model.layers.0.mlp.up_proj.weight"] = t["model.layers.0.mlp.up_proj.weight"][:-1]

    _edit_tensors(small_checkpoint, edit)
    with pytest.raises(
        ValueError,
        match=r"model.safetensors: tensor 'model.layers.0.mlp.up_proj"
        r".weight' has shape \(95, 64\), config.json implies \(96, 64\)",
    ):
        hf.load_model(small_checkpoint)


def test_unknown_tensor_is_named(small_checkpoint):
    _edit_tensors(
        small_checkpoint,
        lambda t: t.update({"model.layers.0.self_attn.q_norm.weight": np.ones(16, np.float32)}),
    )
    with pytest.raises(ValueError, match="no place in Qwen2ForCausalLM.*q_norm"):
        hf.load_model(small_checkpoint)


def test_wrong_architecture_is_named(small_checkpoint):
    path = small_checkpoint / "config.json"
    config = json.loads(path.read_text())
    config.update(model_type="llama", architectures=["LlamaForCausalLM"])
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="config.json: unsupported architecture"):
        hf.load_model(small_checkpoint)


@pytest.mark.parametrize("damage", ["truncated", "garbage_header"])
def test_corrupt_safetensors_file_is_named(small_checkpoint, damage):
    path = small_checkpoint / hf.SINGLE_FILE
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\xff" * 64 + data[64:])
    with pytest.raises(ValueError, match=hf.SINGLE_FILE) as error:
        hf.load_model(small_checkpoint)
    assert "Traceback" not in str(error.value)


def test_export_writes_the_tokenizers_stop_ids_and_copies_the_tokenizer(small_checkpoint, tmp_path):
    from qwen_jax.data.tokenizer import Tokenizer
    from qwen_jax.data.train_tokenizer import DEMO_TOKENIZER_PATH

    model = hf.load_model(small_checkpoint)
    hf.save_model(model, tmp_path / "export", tokenizer_dir=os.path.dirname(DEMO_TOKENIZER_PATH))
    demo = Tokenizer.from_file(DEMO_TOKENIZER_PATH)
    generation = transformers.GenerationConfig.from_pretrained(tmp_path / "export")
    assert generation.eos_token_id == [demo.im_end_id, demo.eos_id] != [151645, 151643]
    assert (tmp_path / "export" / "tokenizer.json").read_bytes() == open(
        DEMO_TOKENIZER_PATH, "rb"
    ).read()
    # Without a tokenizer: Qwen2.5's <|im_end|> and <|endoftext|>.
    hf.save_model(model, tmp_path / "bare")
    generation = transformers.GenerationConfig.from_pretrained(tmp_path / "bare")
    assert generation.eos_token_id == [151645, 151643]


def test_failed_export_leaves_nothing(small_checkpoint, tmp_path):
    out = tmp_path / "export"
    with pytest.raises(FileNotFoundError, match="none of"):
        hf.save_model(hf.load_model(small_checkpoint), out, tokenizer_dir=tmp_path / "absent")
    assert sorted(os.listdir(tmp_path)) == ["hf"]


def test_an_export_is_readable_by_other_users(small_checkpoint, tmp_path):
    umask = os.umask(0o022)
    try:
        hf.save_model(hf.load_model(small_checkpoint), tmp_path / "export")
    finally:
        os.umask(umask)
    assert os.stat(tmp_path / "export").st_mode & 0o777 == 0o755
    for name in os.listdir(tmp_path / "export"):
        assert os.stat(tmp_path / "export" / name).st_mode & 0o777 == 0o644, name
