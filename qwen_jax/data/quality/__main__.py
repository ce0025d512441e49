"""`python -m qwen_jax.data.quality --gin_file=configs/quality/dedup.gin
--gin_param="INPUT='raw/*.jsonl'" --gin_param="OUTPUT='clean'"`: runs the quality stages the gin
files compose over INPUT and writes OUTPUT (kept shards, `removed/`, `report/`, `summary.json`);
run again to resume a stopped run. Model stages run on the mesh a mesh gin file configures
(default: every local device on `fsdp`). Bad input is one `error:` line and exit status 1.
"""

from __future__ import annotations

import json
import sys

from absl import app

from qwen_jax import cli


def quality() -> None:
    from qwen_jax import configurables
    from qwen_jax.data.quality import run
    from qwen_jax.parallel import host_data

    cli.parse_gin(cli.GIN_FILE.value, cli.GIN_PARAM.value, default_mesh=True)
    config = configurables.QualityConfig()
    summary = run.run_pipeline(config, host_data.Placement(*configurables.mesh_and_rules()))
    print(
        f"{summary['documents']} documents: {summary['kept']} kept, {summary['removed']} removed "
        f"-> {config.output}"
    )
    for rule, count in summary["rules"].items():
        print(f"  removed by {rule}: {count}")
    for name, stage in summary["stages"].items():
        print(f"  stage {name}: {json.dumps(stage)}")


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(cli.run(quality, argv)))
