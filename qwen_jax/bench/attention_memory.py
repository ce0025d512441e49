"""Per-chip memory of the train step with each attention implementation, compiled ahead of time
for a TPU slice (libtpu, no TPU), at sequence lengths with a constant number of tokens per step.

  python -m qwen_jax.bench.attention_memory --gin_file=configs/models/qwen2_5_7b.gin \\
      --topology=v5p-32 --tokens_per_step=524288 --seq_lens=8192,16384,32768

Two figures per row: the whole step's per-chip peak (`aot.compile_report`: bf16 compute, full
remat, FSDP over every chip), and the attention alone, forward and backward of one layer at the
step's shapes (compiled per-chip peak: q, k, v, their gradients and the temporaries). At
constant tokens per step, attention memory that grows linearly with the sequence stays flat;
quadratic (the XLA scores) doubles with each doubling of the sequence. Rows are printed as JSON,
then a Markdown table.
"""

from __future__ import annotations

import json
import sys

import gin
import jax
import jax.numpy as jnp
from absl import app, flags

from qwen_jax import aot, cli, configurables
from qwen_jax.kernels import registry
from qwen_jax.parallel import logical
from qwen_jax.parallel import mesh as mesh_lib

_TOKENS = flags.DEFINE_integer("tokens_per_step", 524288, "global batch x sequence length")
_SEQ_LENS = flags.DEFINE_list("seq_lens", ["8192", "16384", "32768"], "sequence lengths")
_IMPLS = flags.DEFINE_list("impls", ["xla", "splash", "pallas"], "attention implementations")

_GIB = 2**30
FLAGS = flags.FLAGS  # --topology is qwen_jax.aot's flag


def attention_peak_bytes(config, runtime, mesh, rules, batch: int, seq_len: int) -> int:
    """Compiled per-chip peak (arguments, outputs and temporaries) of one layer's attention,
    forward and backward, with the step's shardings (batch over the data axes, heads over
    `tensor`)."""
    fn = registry.attention_fn(
        runtime.attention_impl,
        mesh=mesh,
        rules=rules,
        block_size=runtime.attention_block_size,
        flash_block_sizes=runtime.flash_block_sizes,
    )
    dtype = runtime.compute_dtype

    def array(heads, names):
        sharding = jax.sharding.NamedSharding(mesh, logical.logical_to_spec(names, rules))
        return jax.ShapeDtypeStruct(
            (batch, seq_len, heads, config.head_dim), dtype, sharding=sharding
        )

    tokens = jax.ShapeDtypeStruct(
        (batch, seq_len), jnp.int32, sharding=mesh_lib.batch_sharding(mesh, rules, batch, seq_len)
    )
    q = array(config.num_attention_heads, ("activation_batch", None, "activation_heads", None))
    kv = array(config.num_key_value_heads, ("activation_batch", None, "activation_kv_heads", None))

    def loss(q, k, v, segments, positions):
        out = fn(
            q,
            k,
            v,
            q_segment_ids=segments,
            kv_segment_ids=segments,
            q_positions=positions,
            kv_positions=positions,
        )
        return jnp.sum(out.astype(jnp.float32))

    compiled = jax.jit(jax.grad(loss, (0, 1, 2))).lower(q, kv, kv, tokens, tokens).compile()
    memory = compiled.memory_analysis()
    return int(
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        + memory.temp_size_in_bytes
        - memory.alias_size_in_bytes
    )


def row(impl: str, seq_len: int) -> dict:
    gin.clear_config()
    aot.parse_gin(cli.GIN_FILE.value, [*cli.GIN_PARAM.value, f"Runtime.attention_impl = '{impl}'"])
    batch = _TOKENS.value // seq_len
    report = aot.report_from_gin(topology=FLAGS.topology, seq_len=seq_len, global_batch=batch)
    config, runtime = configurables.QwenConfig(), configurables.Runtime()
    mesh = mesh_lib.make_mesh(configurables.MeshConfig(), aot.topology_devices(FLAGS.topology))
    try:
        attention = attention_peak_bytes(
            config, runtime, mesh, configurables.logical_rules(), batch, seq_len
        )
    except jax.errors.JaxRuntimeError as error:
        if "RESOURCE_EXHAUSTED" not in str(error):
            raise
        attention = None  # more than the chip holds
    keys = ("fits", "peak_bytes_per_chip", "temp_bytes", "compile_error", "device_kind")
    return {
        "impl": impl,
        "seq_len": seq_len,
        "global_batch": batch,
        "topology": FLAGS.topology,
        "attention_peak_bytes_per_chip": attention,
        **{k: report[k] for k in keys if k in report},
    }


def _gib(value) -> str:
    return "over HBM" if value is None else f"{value / _GIB:.2f}"


def main() -> None:
    if not FLAGS.topology:
        raise app.UsageError("--topology is required (e.g. v5p-32)")
    rows = []
    for seq_len in map(int, _SEQ_LENS.value):
        for impl in _IMPLS.value:
            rows.append(row(impl, seq_len))
            print(json.dumps(rows[-1]), flush=True)
    print("\n| seq | batch | impl | step peak GiB/chip | attention fwd+bwd peak GiB/chip |")
    print("|---|---|---|---|---|")
    for r in rows:
        peak = _gib(r.get("peak_bytes_per_chip"))
        if not r["fits"]:
            peak = f"over HBM (temporaries {_gib(r.get('temp_bytes'))})"
        print(
            f"| {r['seq_len']} | {r['global_batch']} | {r['impl']} | {peak} "
            f"| {_gib(r['attention_peak_bytes_per_chip'])} |"
        )


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(cli.run(main, argv)))
