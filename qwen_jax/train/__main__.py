"""`python -m qwen_jax.train --gin_file=A.gin [--gin_file=B.gin ...] [--gin_param=NAME=VALUE ...]
--workdir=DIR`: trains what the gin files describe (pre-training, SFT or DPO), resuming from the
newest checkpoint in DIR. Without a mesh gin file, every local device goes on the `fsdp` axis
(`qwen_jax.cli.DEFAULT_MESH_FILE`).

Bad input (an unknown or missing gin value, a missing data path, a data file in an unknown
format, a tokenizer that does not belong to the model, a checkpoint of another model, a workdir
of another run) ends with one line naming the problem and exit status 1; nothing in the workdir
is overwritten. SIGTERM at any moment ends with exit 0: the step reached is saved, or nothing
when no step ran.
"""

from __future__ import annotations

import sys

from qwen_jax.train import preemption

preemption.install()  # first thing: from start-up to exit a SIGTERM never cuts the run half-way

from absl import app, flags, logging  # noqa: E402

from qwen_jax import cli  # noqa: E402
from qwen_jax.launch import distributed  # noqa: E402

WORKDIR = flags.DEFINE_string("workdir", None, "checkpoints, metrics and TensorBoard events")
flags.mark_flag_as_required("workdir")


def train() -> None:
    import gin

    distributed.initialize_from_flags()
    from qwen_jax import configurables
    from qwen_jax.train import loop

    cli.parse_gin(cli.GIN_FILE.value, cli.GIN_PARAM.value, default_mesh=True)
    result = loop.train(WORKDIR.value, configurables.train_setup())
    logging.info("done at step %d; operative config:\n%s", result.step, gin.operative_config_str())


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(cli.run(train, argv)))
