"""Every repository path and every `python -m` module that README.md and docs/*.md name exists."""

import glob
import importlib.util
import os
import re

import pytest

from qwen_jax.cli import REPO_ROOT

DOCS = [os.path.join(REPO_ROOT, "README.md"), *glob.glob(os.path.join(REPO_ROOT, "docs", "*.md"))]
PATH = re.compile(r"\b((?:configs|qwen_jax|tests|docs|launch|benchmarks|\.ci)/[\w./-]*\w)")
MODULE = re.compile(r"python -m (\w+(?:\.\w+)*)")


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: os.path.relpath(d, REPO_ROOT))
def test_named_paths_and_modules_exist(doc):
    with open(doc, encoding="utf-8") as f:
        text = f.read()
    paths = set(PATH.findall(text))
    modules = set(MODULE.findall(text)) - {"pytest", "venv", "pip"}
    assert paths or modules
    missing = [p for p in paths if not os.path.exists(os.path.join(REPO_ROOT, p))]
    missing += [m for m in modules if importlib.util.find_spec(m) is None]
    assert not missing, missing
