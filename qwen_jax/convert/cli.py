"""What the conversion entry points (import_hf, export) share: optional mesh gin files, and
bad input reported as one line."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from absl import flags

GIN_FILE = flags.DEFINE_multi_string("gin_file", [], "mesh gin files (optional), in order")
GIN_PARAM = flags.DEFINE_multi_string("gin_param", [], "gin bindings applied after the files")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def gin_mesh():
    """(mesh, logical rules) when gin files or bindings are given (they must configure the mesh,
    e.g. configs/mesh/fsdp.gin), else (None, None): everything on the first device."""
    if not GIN_FILE.value and not GIN_PARAM.value:
        return None, None
    import gin
    from qwen_jax.parallel import mesh as mesh_lib
    gin.add_config_file_search_path(os.getcwd())
    gin.add_config_file_search_path(REPO_ROOT)
    for file in GIN_FILE.value:
        if not any(os.path.exists(os.path.join(root, file)) for root in (os.getcwd(), REPO_ROOT)):
            raise FileNotFoundError(f"--gin_file={file}: not found in {os.getcwd()} or {REPO_ROOT}")
    gin.parse_config_files_and_bindings(GIN_FILE.value, GIN_PARAM.value)
    return mesh_lib.make_mesh(), mesh_lib.logical_rules()


def run_conversion(convert: Callable, output: str) -> int:
    """Runs `convert(mesh, rules)` (see `gin_mesh`) for an entry point: bad input (a missing file,
    a wrong tensor, a bad gin file) is one `error:` line and exit status 1; success says where
    it wrote."""
    try:
        convert(*gin_mesh())
    except (ValueError, OSError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {output}")
    return 0
