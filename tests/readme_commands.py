"""The shell commands of README.md, so tests run them as written (plus overrides appended).

A command is a line of a ```bash block (backslash continuations joined) or a `python -m ...`
code span in a table. `command(prefix)` returns the one command starting with `prefix`;
`run(cmd, cwd, *overrides)` runs it with `python` as this interpreter and leading `NAME=value`
words as environment variables.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tempfile

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO_ROOT, "README.md")


def commands() -> list[str]:
    with open(README, encoding="utf-8") as f:
        text = f.read()
    found = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        joined = re.sub(r"\s*\\\n\s*", " ", block)
        found += [line.split("  #")[0].strip() for line in joined.splitlines() if line.strip()]
    found += re.findall(r"^\| `(python -m [^`]+)` \|", text, re.M)
    return found


def command(prefix: str) -> str:
    matches = [c for c in commands() if c.startswith(prefix)]
    assert len(matches) == 1, (prefix, matches)
    return matches[0]


def env(**extra) -> dict:
    e = dict(os.environ)
    e["JAX_PLATFORMS"] = "cpu"
    e["XLA_FLAGS"] = ""  # one CPU device
    e["JAX_COMPILATION_CACHE_DIR"] = os.path.join(tempfile.gettempdir(), "qwen_jax_test_jit_cache")
    e["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    e.update(extra)
    return e


def split(cmd: str) -> tuple[list[str], dict[str, str]]:
    """(argv with this interpreter as `python`, the leading `NAME=value` environment words)."""
    words = shlex.split(cmd)
    extra = {}
    while "=" in words[0] and not words[0].startswith("-"):
        name, value = words.pop(0).split("=", 1)
        extra[name] = value
    assert words[0] == "python", cmd
    return [sys.executable, *words[1:]], extra


def run(
    cmd: str, cwd, *overrides: str, timeout: int = 900, check: bool = True
) -> subprocess.CompletedProcess:
    program, extra = split(cmd)
    result = subprocess.run(
        [*program, *overrides],
        cwd=cwd,
        env=env(**extra),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and result.returncode:
        raise AssertionError(
            f"{cmd} {' '.join(overrides)}: exit {result.returncode}\n{result.stderr[-5000:]}"
        )
    return result
