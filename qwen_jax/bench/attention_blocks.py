"""Attention work on packed rows: the (query block, key block) pairs our Pallas kernel computes,
against a kernel that skips only by a static causal mask (splash) and against every pair.

  python -m qwen_jax.bench.attention_blocks --seq_len=32768 --mean_doc_tokens=512,2048,8192

Documents with exponentially distributed lengths (the given means) are packed into rows by the
trainer's own packer (`data/packing.py`, both packings); the counts come from the kernel's own
skip predicate (`kernels/block_skip.py`) at the TPU generation's block size. Work, not time: a
pair costs the same in either kernel, and a skipped one costs neither compute nor K/V copies.
"""

from __future__ import annotations

import sys

import grain
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from qwen_jax import cli
from qwen_jax.data import examples, packing
from qwen_jax.kernels import block_skip, flash_tpu

_SEQ_LEN = flags.DEFINE_integer("seq_len", 32768, "tokens per row")
_MEANS = flags.DEFINE_list("mean_doc_tokens", ["512", "2048", "8192"], "mean document lengths")
_ROWS = flags.DEFINE_integer("rows", 16, "packed rows measured per setting")
_GENERATION = flags.DEFINE_string("generation", "v5p", "block sizes from this TPU generation")
_SEED = flags.DEFINE_integer("seed", 0, "document lengths")


def packed_rows(mean: int, seq_len: int, rows: int, packing_name: str, seed: int):
    rng = np.random.default_rng(seed)
    lengths = np.maximum(1, rng.exponential(mean, 4 * rows * seq_len // mean + 16)).astype(int)
    docs = [
        piece
        for n in lengths
        for piece in examples.split_example(
            examples.shifted_example(np.ones(n + 1, np.int32), np.ones(n + 1, np.int32)), seq_len
        )
    ]
    ds = packing.pack(
        grain.MapDataset.source(docs).to_iter_dataset(),
        seq_len=seq_len,
        packing=packing_name,
        num_packing_bins=8,
        seed=seed,
        pad_id=0,
    )
    iterator = iter(ds)
    batch = [next(iterator) for _ in range(rows)]
    return (np.stack([row[key] for row in batch]) for key in ("segment_ids", "positions"))


def main() -> None:
    blocks = flash_tpu.GENERATION_BLOCKS[_GENERATION.value]
    seq_len = _SEQ_LEN.value
    q_blocks, kv_blocks = seq_len // blocks.q, seq_len // blocks.kv
    print(f"seq {seq_len}, blocks {blocks.q}x{blocks.kv} ({_GENERATION.value}), {_ROWS.value} rows")
    print("| packing | mean doc tokens | pairs computed: ours | causal only (splash) | all |")
    print("|---|---|---|---|---|")
    causal_rows = np.ones((1, seq_len), np.int32)
    positions = np.arange(seq_len, dtype=np.int32)[None]
    causal = int(
        block_skip.visited_pairs(
            causal_rows, causal_rows, positions, positions, blocks.q, blocks.kv
        ).sum()
    )
    for packing_name in packing.PACKINGS:
        for mean in map(int, _MEANS.value):
            segments, positions = (
                jnp.asarray(x)
                for x in packed_rows(mean, seq_len, _ROWS.value, packing_name, _SEED.value)
            )
            ours = block_skip.visited_pairs(
                segments, segments, positions, positions, blocks.q, blocks.kv
            )
            per_row = float(ours.sum()) / _ROWS.value
            print(
                f"| {packing_name} | {mean} | {per_row:.0f} ({per_row / causal:.1%} of causal) "
                f"| {causal} | {q_blocks * kv_blocks} |"
            )


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(cli.run(main, argv)))
