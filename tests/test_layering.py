"""Configuration enters at the top: the packages below the entry points import no gin."""

import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "qwen_jax"
# The entry points (qwen_jax/*.py, train/__main__.py, train/demo.py, bench/) parse gin; the code
# they configure takes plain arguments.
LOWER = ("model", "kernels", "parallel", "convert", "checkpoint", "data", "train")
ENTRY_POINTS = {"train/__main__.py", "train/demo.py"}


@pytest.mark.parametrize("package", LOWER)
def test_no_gin_below_the_entry_points(package):
    offenders = [
        str(path.relative_to(PACKAGE))
        for path in sorted((PACKAGE / package).rglob("*.py"))
        if str(path.relative_to(PACKAGE)) not in ENTRY_POINTS
        and any(
            line.strip() in ("import gin", "from gin import") or line.strip().startswith("from gin")
            for line in path.read_text().splitlines()
        )
    ]
    assert not offenders, offenders
