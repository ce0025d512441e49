"""Reward models against transformers' `Qwen2ForSequenceClassification`: scores of a padded
batch, and import -> export through the entry points, tensor for tensor."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from conftest import run, tiny_config
from qwen_jax.checkpoint import model_io
from qwen_jax.convert import hf
from qwen_jax.model.generate import prompt_positions

PAD = 0


def hf_reward_model(config, seed: int = 0, std: float = 0.2):
    """A float32 transformers reward model, every weight drawn at random (see `hf_model`)."""
    torch.manual_seed(seed)
    model = transformers.Qwen2ForSequenceClassification(
        transformers.Qwen2Config(**config.to_hf_config())
    )
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std)
    return model.eval().float()


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def reference(request, tmp_path_factory):
    config = tiny_config(num_labels=1, pad_token_id=PAD, tie_word_embeddings=request.param)
    model = hf_reward_model(config)
    directory = tmp_path_factory.mktemp("rm") / "hf"
    model.save_pretrained(directory, max_shard_size="60KB")
    return config, model, directory


def padded_batch(vocab: int, side: str, length: int = 24, seed: int = 0):
    """ids (never the pad id inside a row) and the mask of rows of 24, 17 and 9 tokens."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(1, vocab, (3, length))
    mask = np.zeros_like(ids)
    for row, n in enumerate((24, 17, 9)):
        span = slice(0, n) if side == "right" else slice(length - n, length)
        mask[row, span] = 1
    return np.where(mask == 1, ids, PAD), mask


@pytest.mark.parametrize("side", ["right", "left"])
def test_scores_equal_transformers(reference, side):
    config, hf_reference, directory = reference
    ids, mask = padded_batch(config.vocab_size, side)
    with torch.no_grad():
        want = hf_reference(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    model = hf.load_model(directory)
    assert model.config == config
    positions = prompt_positions(mask) if side == "left" else jnp.arange(ids.shape[1])[None]
    got = np.asarray(model(jnp.asarray(ids), positions, jnp.asarray(mask)))
    assert got.shape == want.shape == (3, 1)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


def test_import_export_is_bit_exact(reference, tmp_path):
    config, hf_reference, directory = reference
    result = run(
        "qwen_jax.import_hf", f"--hf_dir={directory}", f"--output={tmp_path / 'ckpt'}",
        "--dtype=float32",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert model_io.read_model_config(tmp_path / "ckpt") == config
    result = run(
        "qwen_jax.export", f"--checkpoint={tmp_path / 'ckpt'}", f"--output_dir={tmp_path / 'out'}",
        "--dtype=float32",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    exported = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "out", dtype=torch.float32
    )
    assert type(exported) is transformers.Qwen2ForSequenceClassification
    assert exported.config.num_labels == 1 and exported.config.pad_token_id == PAD
    want, got = hf_reference.state_dict(), exported.state_dict()
    assert set(want) == set(got)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)
