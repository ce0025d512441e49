"""Test-wide setup: an emulated 8-device CPU mesh, set before jax is imported."""

import os
import pathlib

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import sys  # noqa: E402

import pytest  # noqa: E402

# The helpers that run the real entry point on a tiny model (tests/train/train_runs.py).
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent / "train"))

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
QWEN_TOKENIZER = REPO_ROOT.parent / "shared" / "tokenizers" / "qwen2.5" / "tokenizer.json"


@pytest.fixture(scope="session")
def qwen_tokenizer_path():
    """The real Qwen2.5 tokenizer.json from ../shared, or skip when it is absent."""
    if not QWEN_TOKENIZER.exists():
        pytest.skip(f"{QWEN_TOKENIZER} is absent")
    return QWEN_TOKENIZER


@pytest.fixture(scope="session")
def tiny_pretrain_data(tmp_path_factory):
    import train_runs

    return train_runs.write_data(tmp_path_factory.mktemp("tiny_pretrain_data"))


@pytest.fixture(scope="session")
def tiny_pretrain_reference(tiny_pretrain_data, tmp_path_factory):
    """The uninterrupted 40-step, two-stage tiny run (checkpoints every 7 steps) that resumed and
    interrupted runs must reproduce bit for bit."""
    import train_runs

    workdir = tmp_path_factory.mktemp("uninterrupted")
    train_runs.run(workdir, train_runs.PRETRAIN_GIN, train_runs.tiny_pretrain(tiny_pretrain_data))
    return workdir
