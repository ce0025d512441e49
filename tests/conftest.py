"""Test-wide setup: an emulated 8-device CPU mesh, set before jax is imported."""

import os
import pathlib

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
QWEN_TOKENIZER = REPO_ROOT.parent / "shared" / "tokenizers" / "qwen2.5" / "tokenizer.json"


@pytest.fixture(scope="session")
def qwen_tokenizer_path():
    """The real Qwen2.5 tokenizer.json from ../shared, or skip when it is absent."""
    if not QWEN_TOKENIZER.exists():
        pytest.skip(f"{QWEN_TOKENIZER} is absent")
    return QWEN_TOKENIZER
