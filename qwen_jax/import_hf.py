"""Converts a Hugging Face Qwen2/Qwen2.5 checkpoint into a model checkpoint for training.

  python -m qwen_jax.import_hf --hf_dir=Qwen2.5-7B --output=ckpt/qwen2.5-7b \
      [--dtype=bfloat16] [--gin_file=configs/mesh/fsdp.gin --gin_param=...]

Reads `config.json` and the safetensors shards (checked tensor by tensor against the config) and
writes `qwen_jax.checkpoint.model_io`'s layout, which `train.init_from` and `export` read. The
directory's tokenizer files (tokenizer.json, tokenizer_config.json with the chat template,
generation_config.json) are stored with the weights: training from the checkpoint and exporting
it use that tokenizer. With mesh gin files, parameters are created sharded on that mesh and each
process reads only the slices its devices hold; without them everything goes to the first device.
"""

from __future__ import annotations

import sys

from absl import app, flags

from qwen_jax import cli

_HF_DIR = flags.DEFINE_string("hf_dir", None, "directory with config.json and *.safetensors")
_OUTPUT_DIR = flags.DEFINE_string("output", None, "model checkpoint to create (must not exist)")
_DTYPE = flags.DEFINE_enum(
    "dtype",
    "bfloat16",
    ["bfloat16", "float32"],
    "stored parameter dtype (training casts to Runtime.param_dtype on load)",
)
flags.mark_flags_as_required(["hf_dir", "output"])


def convert() -> None:
    from qwen_jax.checkpoint import model_io
    from qwen_jax.convert import hf
    from qwen_jax.model.layers import Runtime

    mesh, rules = cli.mesh_from_flags()
    model = hf.load_model(_HF_DIR.value, Runtime(param_dtype=_DTYPE.value), mesh=mesh, rules=rules)
    model_io.save_model_checkpoint(
        _OUTPUT_DIR.value, model_io.model_params(model), model.config, tokenizer_from=_HF_DIR.value
    )
    print(f"wrote {_OUTPUT_DIR.value}")


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(cli.run(convert, argv)))
