"""`python -m qwen_jax.train --gin_file=A.gin [--gin_file=B.gin ...] [--gin_param=NAME=VALUE ...]
--workdir=DIR`: trains what the gin files describe (pre-training, SFT or DPO), resuming from the
newest checkpoint in DIR.

Bad input (an unknown gin parameter, a missing data path, a checkpoint of another model, a
workdir of another run) ends with one line naming the problem and exit status 1; nothing in the
workdir is overwritten.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging

FLAGS = flags.DEFINE_multi_string("gin_file", [], "gin files, applied in order")
PARAMS = flags.DEFINE_multi_string("gin_param", [], "gin bindings applied after the files")
WORKDIR = flags.DEFINE_string("workdir", None, "checkpoints, metrics and TensorBoard events")
MULTIHOST = flags.DEFINE_bool(
    "multihost", False, "join the other hosts of a TPU slice or GPU cluster (jax.distributed); "
    "the coordinator, process count and index come from the TPU metadata or Slurm")
flags.mark_flag_as_required("workdir")


def main(argv) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import gin
    import jax
    if MULTIHOST.value:
        jax.distributed.initialize()
    from qwen_jax.data.bad_records import BadInputError
    from qwen_jax.train import loop
    try:
        loop.parse_gin(FLAGS.value, PARAMS.value)
        result = loop.train(WORKDIR.value)
    except (ValueError, FileNotFoundError, BadInputError, loop.NonFiniteError) as e:
        logging.debug("error", exc_info=True)
        print(f"error: {e}", file=sys.stderr)
        return 1
    logging.info("done at step %d; operative config:\n%s", result.step, gin.operative_config_str())
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
