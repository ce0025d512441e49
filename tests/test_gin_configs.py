"""Every shipped training gin file parses: names, imports and includes resolve."""

import glob
import os
import re

import gin
import pytest

from qwen_jax.train import loop

ROOT = loop.REPO_ROOT
FILES = sorted(os.path.relpath(p, ROOT) for pattern in (
    "configs/pretrain/*.gin", "configs/demo/*.gin", "configs/sft.gin", "configs/dpo.gin")
    for p in glob.glob(os.path.join(ROOT, pattern)))


def test_there_are_configs():
    assert "configs/demo/pretrain.gin" in FILES and "configs/sft.gin" in FILES


@pytest.mark.parametrize("path", FILES)
def test_parses(path):
    """Parses with a placeholder for each required macro (data paths, step counts), which the
    user binds on the command line; any other error fails the test."""
    # ci.gin is an override layer: it is parsed on top of the demo phases it shortens.
    base = ["configs/demo/pretrain.gin", "configs/demo/sft.gin"] if path.endswith("ci.gin") else []
    bindings = []
    for _ in range(20):
        gin.clear_config()
        try:
            gin.add_config_file_search_path(ROOT)
            gin.parse_config_files_and_bindings([*base, os.path.join(ROOT, path)], bindings)
            return
        except ValueError as e:
            required = re.match(r"(\w+)/macro.value set to `%gin.REQUIRED`", str(e))
            if not required:
                raise
            bindings.append(f"{required.group(1)} = 1")
        finally:
            gin.clear_config()
    pytest.fail(f"{path}: too many required macros: {bindings}")
