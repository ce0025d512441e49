"""The conversion entry points end to end: HF -> `import_hf` -> model checkpoint -> `export` -> HF."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
import transformers

from conftest import hf_model, left_padded_batch, run, tiny_config
from qwen_jax.checkpoint import model_io
from qwen_jax.model.generate import prompt_positions


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf") / "hf"
    model = hf_model(tiny_config())
    model.save_pretrained(directory, max_shard_size="60KB")
    return model, directory


@pytest.fixture(scope="module")
def imported(reference, tmp_path_factory):
    """import_hf on all 8 emulated devices with the fsdp mesh preset, stored in float32."""
    out = tmp_path_factory.mktemp("ckpt") / "model"
    result = run(
        "qwen_jax.import_hf",
        f"--hf_dir={reference[1]}",
        f"--output={out}",
        "--dtype=float32",
        "--gin_file=configs/mesh/fsdp.gin",
    )
    assert result.returncode == 0, result.stderr
    return out


def test_imported_checkpoint_reproduces_transformers_logits(reference, imported):
    hf_reference, _ = reference
    config = model_io.read_model_config(imported)
    assert config == tiny_config()
    ids, mask = left_padded_batch(config.vocab_size)
    with torch.no_grad():
        expected = hf_reference(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    model = model_io.load_model(imported)
    logits = np.asarray(model(jnp.asarray(ids), prompt_positions(mask), jnp.asarray(mask)))
    real = mask.astype(bool)
    np.testing.assert_allclose(logits[real], expected[real], rtol=0, atol=1e-5)


def test_restore_casts_to_the_requested_dtype(imported):
    _, params = model_io.load_model_checkpoint(imported, dtype="bfloat16")
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype("bfloat16")}


def test_training_step_directory_exports_to_transformers(reference, imported, tmp_path):
    """A step directory as TrainCheckpointer writes it (the model items next to the optimizer's)
    exports to an HF checkpoint whose tensors equal the original ones exactly."""
    hf_reference, _ = reference
    config, params = model_io.load_model_checkpoint(imported)
    manager = ocp.CheckpointManager(
        tmp_path / "checkpoints", item_names=("params", "model_config", "opt_state")
    )
    manager.save(
        7,
        args=ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            model_config=ocp.args.JsonSave(config.to_hf_config()),
            opt_state=ocp.args.StandardSave({"count": jnp.zeros((), jnp.int32)}),
        ),
    )
    manager.wait_until_finished()
    out = tmp_path / "hf_out"
    result = run(
        "qwen_jax.export",
        f"--checkpoint={tmp_path / 'checkpoints' / '7'}",
        f"--output_dir={out}",
        "--dtype=float32",
    )
    assert result.returncode == 0, result.stderr
    exported = transformers.Qwen2ForCausalLM.from_pretrained(out, dtype=torch.float32)
    want, got = hf_reference.state_dict(), exported.state_dict()
    assert set(want) == set(got)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)


def test_import_refuses_an_existing_output(reference, imported):
    result = run("qwen_jax.import_hf", f"--hf_dir={reference[1]}", f"--output={imported}")
    assert result.returncode == 1
    assert result.stderr.strip().endswith("already exists; refusing to overwrite")


def test_export_names_a_directory_that_is_no_checkpoint(tmp_path):
    result = run("qwen_jax.export", f"--checkpoint={tmp_path}", f"--output_dir={tmp_path}/o")
    assert result.returncode == 1
    assert "no 'params' item; not a model checkpoint" in result.stderr
    assert not os.path.exists(tmp_path / "o")
