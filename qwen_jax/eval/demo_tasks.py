"""lm-eval tasks over the demo world, written as YAML beside local JSONL (no download):

    python -m qwen_jax.eval.demo_tasks --output_dir=tasks
    python -m qwen_jax.eval --model qwen_jax --model_args pretrained=DIR \
      --include_path tasks --tasks qwen_demo

- `qwen_demo_facts`: multiple choice (acc, acc_norm) on the country facts, "Q: ...\\nA:" as the
  pre-training text asks them, each right answer against three of the same kind.
- `qwen_demo_arithmetic`: greedy generation up to a newline, exact match on every addition and
  subtraction of the demo world.
- `qwen_demo_text`: rolling log-likelihood (word and byte perplexity, bits per byte) of the held-out
  pre-training documents.
All three carry the tag `qwen_demo`. The YAML names its JSONL by absolute path, as lm-eval's
`json` loader needs, so the directory is written where it is used.
"""

from __future__ import annotations

import os
import random

import yaml
from absl import app, flags

from qwen_jax.data import demo_corpus

TAG = "qwen_demo"
_QUESTION = "Q: {{question}}\nA:"


def fact_docs(seed: int = 0) -> list[dict]:
    world = demo_corpus.make_world(seed)
    rng = random.Random(seed)
    docs = []
    for kind, question in (
        ("capital", "What is the capital of {}?"),
        ("color", "What color is the flag of {}?"),
        ("animal", "What is the national animal of {}?"),
    ):
        values = sorted({getattr(c, kind) for c in world})
        for country in world:
            right = getattr(country, kind)
            choices = [right, *rng.sample([v for v in values if v != right], 3)]
            rng.shuffle(choices)
            docs.append(
                {
                    "question": question.format(country.name),
                    "choices": choices,
                    "answer": choices.index(right),
                }
            )
    return docs


def arithmetic_docs(seed: int = 0) -> list[dict]:
    questions = demo_corpus.recall_questions(demo_corpus.make_world(seed))["arithmetic"]
    return [{"question": q, "answer": a} for q, a in questions]


def text_docs(seed: int = 0) -> list[dict]:
    return [{"text": d["text"]} for d in demo_corpus.demo_records("pretrain_eval.jsonl", seed)]


def _task(name: str, data: str, **fields) -> dict:
    return {
        "task": name,
        "tag": [TAG],
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": data}},
        "test_split": "test",
        "fewshot_split": "test",
        **fields,
        "metadata": {"version": 1.0},
    }


def _mean(metric: str, **options) -> dict:
    return {"metric": metric, "aggregation": "mean", "higher_is_better": True, **options}


def tasks(directory: str) -> dict[str, tuple[dict, list[dict]]]:
    """Task name -> (its YAML as a dict, its documents), data in `directory`."""
    data = {
        name: os.path.join(directory, f"{name}.jsonl") for name in ("facts", "arithmetic", "text")
    }
    return {
        f"{TAG}_facts": (
            _task(
                f"{TAG}_facts",
                data["facts"],
                output_type="multiple_choice",
                doc_to_text=_QUESTION,
                doc_to_choice="choices",
                doc_to_target="answer",
                metric_list=[_mean("acc"), _mean("acc_norm")],
            ),
            fact_docs(),
        ),
        f"{TAG}_arithmetic": (
            _task(
                f"{TAG}_arithmetic",
                data["arithmetic"],
                output_type="generate_until",
                doc_to_text=_QUESTION,
                doc_to_target="answer",
                generation_kwargs={"until": ["\n"], "max_gen_toks": 8, "do_sample": False},
                metric_list=[_mean("exact_match", regexes_to_ignore=[" "])],
            ),
            arithmetic_docs(),
        ),
        f"{TAG}_text": (
            _task(
                f"{TAG}_text",
                data["text"],
                output_type="loglikelihood_rolling",
                doc_to_text="",
                doc_to_target="{{text}}",
                metric_list=[
                    {"metric": "word_perplexity"},
                    {"metric": "byte_perplexity"},
                    {"metric": "bits_per_byte"},
                ],
            ),
            text_docs(),
        ),
    }


def write(directory: str | os.PathLike) -> list[str]:
    """Writes the YAML and JSONL of every demo task into `directory`; returns the task names."""
    directory = os.path.abspath(os.fspath(directory))
    os.makedirs(directory, exist_ok=True)
    for name, (config, docs) in tasks(directory).items():
        demo_corpus.write_jsonl(config["dataset_kwargs"]["data_files"]["test"], docs)
        with open(os.path.join(directory, f"{name}.yaml"), "w", encoding="utf-8") as f:
            yaml.safe_dump(config, f, sort_keys=False, allow_unicode=True)
    return sorted(tasks(directory))


OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "where the YAML and JSONL files go")


def main(argv) -> None:
    del argv
    for name in write(OUTPUT_DIR.value):
        print(f"{name}: {os.path.join(os.path.abspath(OUTPUT_DIR.value), name)}.yaml")


if __name__ == "__main__":
    flags.mark_flag_as_required("output_dir")
    app.run(main)
