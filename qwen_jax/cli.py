"""What every `python -m qwen_jax...` entry point shares: the gin flags, gin parsing (T5X-style
search path: the working directory, then the repository root), and bad input reported as one
`error:` line with exit status 1 (the traceback goes to the log at debug level).

    def main(argv):
        return cli.run(lambda: ...work...)

gin's own messages for unbound required values are rewritten into what to pass on the command
line, e.g. `error: CHAT_TRAIN is required: set it with --gin_param=CHAT_TRAIN=...`.
"""

from __future__ import annotations

import functools
import os
import re
import sys
from collections.abc import Callable, Sequence

from absl import flags, logging

GIN_FILE = flags.DEFINE_multi_string("gin_file", [], "gin files, applied in order")
GIN_PARAM = flags.DEFINE_multi_string("gin_param", [], "gin bindings applied after the files")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Used when no gin file configures a mesh: every local device on the `fsdp` axis.
DEFAULT_MESH_FILE = "configs/mesh/fsdp.gin"

_REQUIRED_MACRO = re.compile(r"(\S+)/macro\.value set to `%gin\.REQUIRED`")
QUOTES = "'\" "  # around the names in gin's list of unbound arguments
_REQUIRED_ARGS = re.compile(r"Required bindings for `(\S+)` not provided in config: \[(.*)\]")
# A configurable called with required arguments gin has no values for (TypeError).
_MISSING_ARGS = re.compile(
    r"No values supplied by Gin or caller for arguments: \[([^\]]*)\].*"
    r"In call to configurable '(\S+)'",
    re.DOTALL,
)


class UserError(ValueError):
    """Bad input whose message is already the one line the user should read."""


def _find(file: str) -> None:
    if not any(os.path.exists(os.path.join(root, file)) for root in (os.getcwd(), REPO_ROOT)):
        raise UserError(f"--gin_file={file}: not found in {os.getcwd()} or {REPO_ROOT}")


def parse_gin(
    files: Sequence[str],
    params: Sequence[str],
    *,
    default_mesh: bool = False,
    defaults: Sequence[str] = (),
) -> None:
    """Parses `defaults` (bindings), then `files`, then `params`, and finalizes the config.

    default_mesh: when nothing binds the logical-axis rules (no mesh gin file), parse
      `DEFAULT_MESH_FILE` first and say so in the log.
    """
    import gin

    from qwen_jax import configurables  # registers what gin can bind

    gin.add_config_file_search_path(os.getcwd())
    gin.add_config_file_search_path(REPO_ROOT)
    for file in files:
        _find(file)
    _parse([*defaults], files, params)
    if default_mesh and not configurables.binds("logical_rules.rules"):
        import jax

        logging.info(
            "no mesh gin file given: using %s (all %d local devices on the fsdp axis)",
            DEFAULT_MESH_FILE,
            jax.local_device_count(),
        )
        gin.clear_config()
        _parse([*defaults, f"include '{DEFAULT_MESH_FILE}'"], files, params)
    try:
        gin.finalize()
    except Exception as e:
        raise UserError(gin_message(e)) from e


def _parse(bindings: Sequence[str], files: Sequence[str], params: Sequence[str]) -> None:
    """gin.parse_config_files_and_bindings, one file at a time so that an error names its file
    (gin's own messages do for unknown names, not for a syntax error)."""
    import gin

    for source, parse in (
        ("", lambda: gin.parse_config(list(bindings))),
        *((f"--gin_file={f}: ", functools.partial(gin.parse_config_file, f)) for f in files),
        ("", lambda: gin.parse_config(list(params))),
    ):
        try:
            parse()
        except Exception as e:  # anything parsing raises (a syntax or tokenizer error, an import)
            raise UserError(source + gin_message(e)) from e


def mesh_from_flags():
    """(mesh, logical rules) when --gin_file/--gin_param are given (they must configure a mesh,
    e.g. configs/mesh/fsdp.gin), else (None, None): everything on the first device."""
    if not GIN_FILE.value and not GIN_PARAM.value:
        return None, None
    from qwen_jax import configurables

    parse_gin(GIN_FILE.value, GIN_PARAM.value)
    return configurables.mesh_and_rules()


def gin_message(error: BaseException) -> str:
    """gin's error as one line; unbound required values as the flag that binds them."""
    text = str(error)
    if match := _REQUIRED_MACRO.search(text):
        name = match.group(1)
        return f"{name} is required: set it with --gin_param={name}=..."
    if match := _REQUIRED_ARGS.search(text):
        names = [f"{match.group(1)}.{a.strip(QUOTES)}" for a in match.group(2).split(",")]
    elif match := _MISSING_ARGS.search(text):
        names = [f"{match.group(2)}.{a.strip(QUOTES)}" for a in match.group(1).split(",")]
    else:
        names = []
    if names:
        return (
            f"{', '.join(names)} {'is' if len(names) == 1 else 'are'} required: set with "
            + " ".join(f"--gin_param={n}=..." for n in names)
        )
    message = "gin: " + " ".join(line.strip() for line in text.splitlines() if line.strip())
    if "No configurable matching" in text:  # e.g. a reward function nobody registered
        message += (
            " (a function or class of your own must be registered with "
            "gin.external_configurable in a module the gin file imports)"
        )
    return message


def _unbound(error: BaseException) -> bool:
    """Whether `error` is gin's report of required values nobody bound."""
    text = str(error)
    return bool(_REQUIRED_ARGS.search(text) or _MISSING_ARGS.search(text))


def one_line(error: BaseException) -> str:
    if _unbound(error):
        return gin_message(error)
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    return text or type(error).__name__


def run(work: Callable[[], object], argv: Sequence[str] = ()) -> int:
    """Runs an entry point's work: 0 on success; bad input (ValueError, OSError, RuntimeError,
    gin's unbound required values) is one `error:` line on stderr and 1. `argv`: the program's
    arguments after flag parsing, which must be none."""
    if len(argv) > 1:
        from absl import app

        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        work()
    except (ValueError, OSError, RuntimeError, TypeError) as e:
        if isinstance(e, TypeError) and not _unbound(e):
            raise  # a bug, not bad input
        logging.debug("error", exc_info=True)
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 1
    return 0
