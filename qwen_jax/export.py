"""Writes a model checkpoint (import_hf's output or a training step) as a Hugging Face checkpoint.

  python -m qwen_jax.export --checkpoint=workdir/checkpoints/1000 --output_dir=hf_out \
      [--dtype=bfloat16] [--max_shard_gb=5] [--gin_file=configs/mesh/fsdp.gin ...]

The output (config.json, generation_config.json, model-*-of-*.safetensors and their index, and
the tokenizer files) loads with transformers' `AutoModelForCausalLM.from_pretrained` and
`AutoTokenizer.from_pretrained`. The tokenizer is the one that travels with the checkpoint (see
`qwen_jax.checkpoint.model_io.tokenizer_dir`) unless --tokenizer_dir names another. It is staged
in a temporary directory and renamed into place when complete. With mesh gin files the parameters
are spread over the devices and gathered one layer at a time; in a multi-process run (the
`qwen_jax.launch.distributed` flags) every process takes part in the gathers and process 0
writes.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging

from qwen_jax import cli
from qwen_jax.launch import distributed

_CHECKPOINT_DIR = flags.DEFINE_string("checkpoint", None, "model checkpoint or step directory")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "HF checkpoint to create (must not exist)")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "stored tensor dtype")
_TOKENIZER_DIR = flags.DEFINE_string(
    "tokenizer_dir",
    None,
    "directory whose tokenizer files are copied into the export (default: the checkpoint's own)",
)
_MAX_SHARD_GB = flags.DEFINE_float("max_shard_gb", 5.0, "largest safetensors file, in GiB")
flags.mark_flags_as_required(["checkpoint", "output_dir"])


def export() -> None:
    distributed.initialize_from_flags()
    import jax

    from qwen_jax.checkpoint import model_io
    from qwen_jax.convert import hf
    from qwen_jax.model.layers import Runtime

    mesh, rules = cli.mesh_from_flags()
    if mesh is None and jax.process_count() > 1:
        raise ValueError(
            "a multi-process export spreads the parameters over every process's devices: give "
            "a mesh, e.g. --gin_file=configs/mesh/fsdp.gin"
        )
    # Restored in float32 whatever was stored: the cast to --dtype happens once, on write.
    model = model_io.load_model(
        _CHECKPOINT_DIR.value, Runtime(param_dtype="float32"), mesh=mesh, rules=rules
    )
    tokenizer_dir = _TOKENIZER_DIR.value or model_io.tokenizer_dir(_CHECKPOINT_DIR.value)
    if tokenizer_dir is None:
        logging.warning(
            "%s carries no tokenizer and --tokenizer_dir is not set: the export has none",
            _CHECKPOINT_DIR.value,
        )
    hf.save_model(
        model,
        _OUTPUT_DIR.value,
        dtype=_DTYPE.value,
        max_shard_bytes=int(_MAX_SHARD_GB.value * 2**30),
        tokenizer_dir=tokenizer_dir,
    )
    print(f"wrote {_OUTPUT_DIR.value}")


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(cli.run(export, argv)))
