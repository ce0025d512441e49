"""What filtering buys: the demo's pre-training on its noisy text unfiltered and filtered
(configs/quality/demo.gin), the same steps, batch and rows (so the same number of tokens), eval
loss on the clean held-out text, for each seed.

    python -m qwen_jax.bench.quality_pretrain --workdir=/tmp/quality_bench --seeds=0,1,2 --steps=150

Each run is the demo's pre-training phase (configs/demo/pretrain.gin) with `--steps` steps of
128-token rows and then its 20-step long-row stage; only PRETRAIN_TEXT differs (`--gin_param`
applies to both, e.g. a smaller model). Prints one line per seed and writes
`<workdir>/quality_pretrain.json`.
"""

from __future__ import annotations

import json
import os

from absl import app, flags

from qwen_jax import cli
from qwen_jax.train import demo

SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "demo seeds (data and initialization)")
STEPS = flags.DEFINE_integer("steps", 150, "steps of the first (128-token) stage")


def pretrain_eval_loss(workdir: str, text: str, paths: dict, seed: int, steps: int) -> float:
    from qwen_jax.data.train_tokenizer import DEMO_TOKENIZER_PATH

    bindings = [
        f"PRETRAIN_TEXT = '{text}'",
        f"LONG_TEXT = '{paths['long_docs.jsonl']}'",
        f"PRETRAIN_EVAL_TEXT = '{paths['pretrain_eval.jsonl']}'",
        f"setup.RunConfig.tokenizer_path = '{DEMO_TOKENIZER_PATH}'",
        f"STAGE1_STEPS = {steps}",
        f"optimizer.warmup_stable_decay.stable_steps = {steps - 20}",
        "manager.CheckpointConfig.every_steps = 100000",
    ]
    result = demo.run_phase("pretrain", "configs/demo/pretrain.gin", workdir, bindings, seed)
    return float(result.eval["loss"])


def compare() -> None:
    from qwen_jax.data import demo_corpus

    root = os.path.abspath(demo.WORKDIR.value)
    rows = []
    for seed in map(int, SEEDS.value):
        directory = os.path.join(root, f"seed{seed}")
        paths = demo_corpus.write_demo_data(os.path.join(directory, "data"), seed=seed)
        filtered = os.path.join(directory, "data", "filtered")
        summary = demo.filter_text(paths[demo_corpus.RAW_PRETRAIN], filtered)
        raw = pretrain_eval_loss(
            os.path.join(directory, "unfiltered"),
            paths[demo_corpus.RAW_PRETRAIN],
            paths,
            seed,
            STEPS.value,
        )
        clean = pretrain_eval_loss(
            os.path.join(directory, "filtered"),
            os.path.join(filtered, "part-*.jsonl"),
            paths,
            seed,
            STEPS.value,
        )
        rows.append(
            {
                "seed": seed,
                "documents": summary["documents"],
                "kept": summary["kept"],
                "eval_loss_unfiltered": raw,
                "eval_loss_filtered": clean,
            }
        )
        print(
            f"seed {seed}: {summary['documents']} documents, {summary['kept']} kept; eval loss "
            f"on clean held-out text after both stages ({STEPS.value} steps in the first): "
            f"unfiltered {raw:.4f}, "
            f"filtered {clean:.4f} ({raw - clean:+.4f})",
            flush=True,
        )
    with open(os.path.join(root, "quality_pretrain.json"), "w") as f:
        json.dump({"steps": STEPS.value, "runs": rows}, f, indent=1)


if __name__ == "__main__":
    app.run(lambda argv: cli.run(compare, argv))
