"""The embedded end-to-end demo: pre-train, SFT, DPO, GRPO and export a tiny Qwen2.5-architecture
model on the synthetic corpus shipped with qwen_jax, on a laptop CPU.

  python -m qwen_jax.train.demo --workdir=/tmp/demo [--seed=0] [--gin_file=...] [--gin_param=...]

Phases (each a `qwen_jax.train` run with its own gin file, in workdir/<phase>; extra --gin_file
and --gin_param apply to every training phase):
  0. filter    configs/quality/demo.gin over the pre-training text with planted noise (character
               soup, boilerplate, exact and near copies): deduplication and rule filters, into
               workdir/data/filtered (its removed/ and summary.json show what went and why)
  1. pretrain  configs/demo/pretrain.gin: two stages, 400 steps of 128-token rows with RoPE
               theta 1e4, then 20 of 512-token rows with long documents and theta 1e6; names
               the demo tokenizer
  2. sft       configs/demo/sft.gin, from the last pre-training step (and its tokenizer)
  3. dpo       configs/demo/dpo.gin, from the last SFT step (also the frozen reference)
  4. grpo      configs/demo/grpo.gin, from the last DPO step: online RL on arithmetic prompts
               with the exact-match reward, completions sampled from the policy being trained
  5. export    workdir/hf: a Hugging Face checkpoint with the tokenizer that travelled along
It ends with a table of before/after figures, also written to workdir/demo_results.json, with
the pre-trained model's recall of the demo world's questions. About 8 minutes on 2 CPU cores.
A phase already completed in the workdir resumes (and so is skipped) on a second invocation.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

from absl import app, flags, logging

from qwen_jax import cli

WORKDIR = flags.DEFINE_string("workdir", None, "where data, checkpoints and the export go")
SEED = flags.DEFINE_integer("seed", 0, "seed of every phase (initialization, data order)")
flags.mark_flag_as_required("workdir")


def _data_bindings(paths: dict[str, str]) -> list[str]:
    macros = {
        "PRETRAIN_TEXT": "pretrain.jsonl",
        "LONG_TEXT": "long_docs.jsonl",
        "PRETRAIN_EVAL_TEXT": "pretrain_eval.jsonl",
        "CHAT_TRAIN": "chat_train.jsonl",
        "CHAT_EVAL": "chat_eval.jsonl",
        "PREFERENCE_TRAIN": "preference_train.jsonl",
        "PREFERENCE_EVAL": "preference_eval.jsonl",
        "GRPO_PROMPTS": "grpo_prompts.jsonl",
        "GRPO_EVAL": "grpo_eval.jsonl",
    }
    return [f"{macro} = '{paths[name]}'" for macro, name in macros.items()]


def filter_text(raw_path: str, output_dir: str) -> dict:
    """The quality recipe configs/quality/demo.gin over `raw_path` into `output_dir` (resumed, so
    a second invocation only rewrites the report); its summary."""
    import gin

    from qwen_jax import configurables
    from qwen_jax.data.quality import run as quality_run

    gin.clear_config()
    cli.parse_gin(
        ["configs/quality/demo.gin"], [f"INPUT = '{raw_path}'", f"OUTPUT = '{output_dir}'"]
    )
    return quality_run.run_pipeline(configurables.QualityConfig())


def run_phase(name: str, gin_file: str, workdir: str, bindings: list[str], seed: int):
    """One `qwen_jax.train` run; the --gin_file/--gin_param flags apply to every phase."""
    import gin

    from qwen_jax import configurables
    from qwen_jax.train import loop, preemption

    gin.clear_config()
    cli.parse_gin(
        [gin_file, *cli.GIN_FILE.value],
        [*bindings, f"setup.RunConfig.seed = {seed}", *cli.GIN_PARAM.value],
    )
    logging.info("demo phase %s -> %s", name, workdir)
    result = loop.train(os.path.join(workdir, name), configurables.train_setup())
    if preemption.requested():  # the phase saved its step; the same command goes on from there
        logging.warning("SIGTERM: the demo stops after phase %s", name)
        sys.exit(0)
    return result


def last_step_dir(result) -> str:
    return os.path.join(result.workdir, "checkpoints", str(result.step))


def export(step_dir: str, output_dir: str) -> None:
    from qwen_jax.checkpoint import model_io
    from qwen_jax.convert import hf
    from qwen_jax.model.layers import Runtime

    if os.path.exists(output_dir):
        shutil.rmtree(output_dir)  # the demo's own output, rebuilt from the final step
    model = model_io.load_model(step_dir, Runtime(param_dtype="float32"))
    hf.save_model(
        model, output_dir, dtype="float32", tokenizer_dir=model_io.tokenizer_dir(step_dir)
    )


def pretrain_recall(step_dir: str) -> dict[str, float]:
    """The share of the demo world's questions, by kind, that the pre-trained model answers
    right when asked as the pre-training text asks them ('Q: ...\nA:', greedy): what it knows
    before SFT teaches the chat format."""
    import numpy as np

    from qwen_jax.checkpoint import model_io
    from qwen_jax.data import demo_corpus
    from qwen_jax.data.tokenizer import Tokenizer
    from qwen_jax.train.evaluation import greedy_answers

    model = model_io.load_model(step_dir)
    tokenizer = Tokenizer.from_file(
        os.path.join(model_io.tokenizer_dir(step_dir), "tokenizer.json")
    )
    recall = {}
    for kind, questions in demo_corpus.recall_questions(demo_corpus.make_world()).items():
        prompts = [
            np.asarray([tokenizer.eos_id] + tokenizer.encode(f"Q: {q}\nA:"), np.int32)
            for q, _ in questions
        ]
        answers = greedy_answers(model, tokenizer, prompts, max_new_tokens=4)
        recall[kind] = float(
            np.mean([(a.split() or [""])[0] == right for a, (_, right) in zip(answers, questions)])
        )
    return recall


def chat_arithmetic(step_dir: str, system_prompt: str) -> dict[str, float]:
    """Greedy exact match (final number) of a chat model on every arithmetic question of the
    demo world asked as a user turn, split into the questions the chat splits train on and the
    held-out ones (`demo_corpus.is_held_out`), each question counted once."""
    import numpy as np

    from qwen_jax.checkpoint import model_io
    from qwen_jax.data import chat, demo_corpus
    from qwen_jax.data.tokenizer import Tokenizer
    from qwen_jax.train.evaluation import greedy_answers
    from qwen_jax.train.rewards import ExactMatch

    model = model_io.load_model(step_dir)
    tokenizer = Tokenizer.from_file(
        os.path.join(model_io.tokenizer_dir(step_dir), "tokenizer.json")
    )
    questions = demo_corpus.recall_questions(demo_corpus.make_world())["arithmetic"]
    prompts = [
        chat.render_chat(
            [{"role": "user", "content": q}],
            tokenizer,
            add_generation_prompt=True,
            system_prompt=system_prompt,
        )[0]
        for q, _ in questions
    ]
    answers = greedy_answers(model, tokenizer, prompts, max_new_tokens=4)
    right = np.asarray(ExactMatch()(None, answers, answer=[a for _, a in questions]))
    held_out = np.asarray([demo_corpus.is_held_out(q) for q, _ in questions])
    return {"trained": float(right[~held_out].mean()), "held_out": float(right[held_out].mean())}


def figures_table(results: dict) -> str:
    rows = [
        ("pre-training loss (first -> last logged)", "pretrain_loss"),
        ("pre-training eval loss", "pretrain_eval_loss"),
        ("SFT eval loss", "sft_eval_loss"),
        ("SFT exact match, held-out arithmetic (greedy)", "sft_exact_match"),
        ("DPO preference accuracy (policy log p chosen > rejected)", "dpo_preference_accuracy"),
        ("DPO greedy answer == chosen", "dpo_greedy_chosen_rate"),
        ("DPO eval rewards/accuracies (TRL)", "dpo_rewards_accuracies"),
        ("GRPO exact match, held-out arithmetic (greedy)", "grpo_exact_match"),
        ("GRPO exact match, the arithmetic questions it trains on", "grpo_trained_questions"),
    ]
    lines = [f"{'figure':60s} {'before':>8s} {'after':>8s}"]  # held-out data unless named
    for label, key in rows:
        before, after = results[key]
        lines.append(f"{label:60s} {_fmt(before):>8s} {_fmt(after):>8s}")
    return "\n".join(lines)


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def run_demo() -> None:
    from qwen_jax.data import demo_corpus
    from qwen_jax.data.train_tokenizer import DEMO_TOKENIZER_PATH

    workdir = os.path.abspath(WORKDIR.value)
    paths = demo_corpus.write_demo_data(os.path.join(workdir, "data"))
    filtered = os.path.join(workdir, "data", "filtered")
    quality = filter_text(paths[demo_corpus.RAW_PRETRAIN], filtered)
    paths["pretrain.jsonl"] = os.path.join(filtered, "part-*.jsonl")
    data = _data_bindings(paths)

    pretrain = run_phase(
        "pretrain",
        "configs/demo/pretrain.gin",
        workdir,
        data + [f"setup.RunConfig.tokenizer_path = '{DEMO_TOKENIZER_PATH}'"],
        SEED.value,
    )
    sft = run_phase(
        "sft",
        "configs/demo/sft.gin",
        workdir,
        data + [f"INIT_FROM = '{last_step_dir(pretrain)}'"],
        SEED.value,
    )
    dpo = run_phase(
        "dpo",
        "configs/demo/dpo.gin",
        workdir,
        data + [f"INIT_FROM = '{last_step_dir(sft)}'"],
        SEED.value,
    )
    grpo = run_phase(
        "grpo",
        "configs/demo/grpo.gin",
        workdir,
        data + [f"INIT_FROM = '{last_step_dir(dpo)}'"],
        SEED.value,
    )
    export(last_step_dir(grpo), os.path.join(workdir, "hf"))
    recall = pretrain_recall(last_step_dir(pretrain))
    system_prompt = demo_corpus.DEMO_SYSTEM_PROMPT
    arithmetic = [chat_arithmetic(last_step_dir(r), system_prompt) for r in (dpo, grpo)]

    curve = _train_losses(pretrain.workdir)
    results = {
        "pretrain_loss": (curve[0], curve[-1]),
        "pretrain_eval_loss": (pretrain.eval_at_start.get("loss"), pretrain.eval.get("loss")),
        "sft_eval_loss": (sft.eval_at_start.get("loss"), sft.eval.get("loss")),
        "sft_exact_match": (sft.eval_at_start.get("exact_match"), sft.eval.get("exact_match")),
        "dpo_preference_accuracy": (
            dpo.eval_at_start.get("preference_accuracy"),
            dpo.eval.get("preference_accuracy"),
        ),
        "dpo_greedy_chosen_rate": (
            dpo.eval_at_start.get("greedy_chosen_rate"),
            dpo.eval.get("greedy_chosen_rate"),
        ),
        "dpo_rewards_accuracies": (
            dpo.eval_at_start.get("rewards/accuracies"),
            dpo.eval.get("rewards/accuracies"),
        ),
        "grpo_exact_match": (
            grpo.eval_at_start.get("rewards/exact_match"),
            grpo.eval.get("rewards/exact_match"),
        ),
        "grpo_trained_questions": tuple(a["trained"] for a in arithmetic),
    }
    with open(os.path.join(workdir, "demo_results.json"), "w") as f:
        json.dump(
            {
                **results,
                "pretrain_recall": recall,
                # Each arithmetic question once, before and after GRPO.
                "chat_arithmetic": {"dpo": arithmetic[0], "grpo": arithmetic[1]},
                "filter": {k: quality[k] for k in ("documents", "kept", "removed", "rules")},
                "seed": SEED.value,
                "steps": {
                    "pretrain": pretrain.step,
                    "sft": sft.step,
                    "dpo": dpo.step,
                    "grpo": grpo.step,
                },
            },
            f,
            indent=1,
        )
    print(
        f"filter: {quality['documents']} documents, {quality['kept']} kept; removed: "
        + ", ".join(f"{rule} {n}" for rule, n in quality["rules"].items())
        + f" ({filtered})"
    )
    print(figures_table(results))
    print(
        "pre-trained model's recall of the demo world's questions (Q: ...\nA:, greedy): "
        + ", ".join(f"{kind} {share:.3f}" for kind, share in recall.items())
    )
    print(f"Hugging Face export: {os.path.join(workdir, 'hf')}")


def _train_losses(run_dir: str) -> list[float]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    by_step = {r["step"]: r["loss"] for r in records if r["split"] == "train"}
    return [by_step[s] for s in sorted(by_step)]


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(cli.run(run_demo, argv)))
