"""The fit table: for each Qwen2.5 size, the smallest standard slice on which the train step fits.

  python -m qwen_jax.aot_table --generation=v5p --output=/tmp/aot_table.jsonl

For every preset and for seq 4096 (FSDP mesh) and 32,768 (FSDP x sequence=4, `sequence_sharded`
attention), slices are tried from the smallest whose HBM could hold the fp32 weights, gradients
and Adam moments (16 bytes per parameter) upward, and the first that fits is kept. The global batch
is 8,192 tokens per data shard (2 examples at 4096, 1 example over 4 sequence shards at 32,768). Each row is appended to
`--output` as it completes (compiles take minutes on a small host), then a Markdown table is
printed.
"""

from __future__ import annotations

import json
import pathlib
import sys

import gin
from absl import app, flags

from qwen_jax import aot, cli, configurables
from qwen_jax.model.config import parameter_count

_GENERATION = flags.DEFINE_string("generation", "v5p", f"one of {sorted(aot.GENERATIONS)}")
_OUTPUT = flags.DEFINE_string("output", "aot_table.jsonl", "rows appended here as they finish")
_SIZES = flags.DEFINE_list("sizes", ["0_5b", "1_5b", "3b", "7b", "14b", "32b", "72b"], "presets")
_SEQ_LENS = flags.DEFINE_list("seq_lens", ["4096", "32768"], "sequence lengths")
_REMAT = flags.DEFINE_string("remat", "full", "Runtime.remat_policy for every row")

REPO = pathlib.Path(__file__).resolve().parents[1]
TOKENS_PER_DATA_SHARD = 8192
SEQUENCE_SHARDS = 4


def _chips(topology: str) -> int:
    generation, _, count = topology.partition("-")
    return int(count) // aot.GENERATIONS[generation][1]


def _try(size: str, seq_len: int, topology: str) -> dict:
    long = seq_len > 4096
    mesh_file = "fsdp_sequence.gin" if long else "fsdp.gin"
    chips = _chips(topology)
    data_shards = chips // SEQUENCE_SHARDS if long else chips
    batch = data_shards * max(1, TOKENS_PER_DATA_SHARD // seq_len)
    gin.clear_config()
    aot.parse_gin(
        [
            str(REPO / "configs/models" / f"qwen2_5_{size}.gin"),
            str(REPO / "configs/mesh" / mesh_file),
        ],
        [f"layers.Runtime.remat_policy = '{_REMAT.value}'"]
        + ([f"mesh.MeshConfig.sequence = {SEQUENCE_SHARDS}"] if long else []),
    )
    try:
        report = aot.report_from_gin(topology=topology, seq_len=seq_len, global_batch=batch)
    except ValueError as error:  # the model does not divide this mesh
        report = {"topology": topology, "fits": False, "error": str(error)}
    report.update(size=size, mesh_file=mesh_file)
    return report


def _row(r: dict) -> str:
    if "peak_bytes_per_chip" not in r:
        return f"| {r['size']} | {r.get('seq_len', '')} | none fits | | | | | |"
    mesh = "×".join(f"{k}={v}" for k, v in r["mesh"].items() if v > 1)
    return (
        f"| {r['size']} | {r['seq_len']} | {r['topology']} | {mesh} | {r['remat_policy']} | "
        f"{r['global_batch']} | {r['peak_bytes_per_chip'] / 2**30:.1f} / "
        f"{r['hbm_per_chip_bytes'] / 2**30:.1f} GiB | {r['compiled_over_model_flops']:.2f} |"
    )


def main() -> None:
    slices = aot.standard_slices(_GENERATION.value)
    hbm = aot.HBM_BYTES[
        {
            "v4": "TPU v4",
            "v5p": "TPU v5",
            "v5e": "TPU v5 lite",
            "v5litepod": "TPU v5 lite",
            "v6e": "TPU v6 lite",
        }[_GENERATION.value]
    ]
    rows = []
    for size in _SIZES.value:
        gin.clear_config()
        gin.parse_config_file(str(REPO / "configs/models" / f"qwen2_5_{size}.gin"))
        params = parameter_count(configurables.QwenConfig())
        for seq_len in map(int, _SEQ_LENS.value):
            found = {"size": size, "seq_len": seq_len}
            for topology in slices:
                if 16 * params / _chips(topology) > 0.8 * hbm:
                    continue  # the optimizer state alone would not fit
                report = _try(size, seq_len, topology)
                with open(_OUTPUT.value, "a") as out:
                    out.write(json.dumps(report) + "\n")
                if report["fits"]:
                    found = report
                    break
            rows.append(found)
    print(
        "| size | seq | smallest slice | mesh | remat | batch | peak / HBM per chip | "
        "compiled / model FLOPs |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(_row(r))


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(cli.run(main, argv)))
