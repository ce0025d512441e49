"""lm-eval tasks on the training parameters, every N steps of a run (`setup.RunConfig.lm_eval`).

The tasks run through lm-eval's own `simple_evaluate` with the `qwen_jax` model over the
parameters in memory, on the training mesh: no export, no second copy. Each metric goes to
TensorBoard and metrics.jsonl as `lm_eval/<task>/<metric>` (`/<filter>` when the task names a
filter), and lm-eval's whole results JSON to `<workdir>/lm_eval/results_step_<N>.json`.
lm-eval is imported only when the hook runs (the `eval` extra).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence

import jax
from absl import logging

RESULTS_DIR = "lm_eval"


@dataclasses.dataclass(frozen=True)
class LmEvalConfig:
    """Which lm-eval tasks run, and how often."""

    tasks: Sequence[str]  # task or tag names (lm-eval's own, or under `include_path`)
    every_steps: int  # also after the run's last step
    include_path: str | None = None  # a directory of task YAML (e.g. `demo_tasks`' output)
    limit: int | None = None  # documents per task; None: all
    num_fewshot: int | None = None
    batch_size: int = 8
    max_length: int | None = None  # default: the model's max_position_embeddings
    apply_chat_template: bool = False

    def __post_init__(self):
        if not self.tasks:
            raise ValueError("LmEvalConfig.tasks is empty: name at least one lm-eval task")
        if self.every_steps <= 0:
            raise ValueError(f"LmEvalConfig.every_steps={self.every_steps} must be positive")

    def task_manager(self):
        from lm_eval.tasks import TaskManager

        return TaskManager(include_path=self.include_path)

    def check(self) -> None:
        """Refuses, before training starts, task names lm-eval does not know."""
        try:
            known = set(self.task_manager().all_tasks)
        except ImportError as e:
            raise ValueError(
                f"setup.RunConfig.lm_eval needs lm-eval: pip install 'qwen_jax[eval]' ({e})"
            ) from None
        unknown = [t for t in self.tasks if t not in known]
        if unknown:
            raise ValueError(
                f"LmEvalConfig.tasks: unknown lm-eval task(s) {unknown}"
                + (f" (include_path={self.include_path})" if self.include_path else "")
            )


def scalars(results: dict) -> dict[str, float]:
    """`<task>/<metric>` (plus `/<filter>` unless it is 'none') -> value, from lm-eval's
    results; standard errors and non-numbers left out."""
    out = {}
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            if "," not in key or "_stderr" in key or not isinstance(value, (int, float)):
                continue
            metric, filter_name = key.split(",", 1)
            suffix = "" if filter_name == "none" else f"/{filter_name}"
            out[f"{task}/{metric}{suffix}"] = float(value)
    return out


def evaluate(config: LmEvalConfig, model, tokenizer_dir: str, placement, workdir: str, step: int):
    """Runs the tasks on `model`; returns the metrics (every process gets the same)."""
    import lm_eval
    from lm_eval.utils import handle_non_serializable

    from qwen_jax.eval.harness import QwenJaxLM

    lm = QwenJaxLM.from_model(
        model,
        tokenizer_dir,
        placement,
        batch_size=config.batch_size,
        max_length=config.max_length,
    )
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(config.tasks),
        num_fewshot=config.num_fewshot,
        limit=config.limit,
        task_manager=config.task_manager(),
        apply_chat_template=config.apply_chat_template,
        log_samples=False,
        verbosity="WARNING",
    )
    found = scalars(results)
    if jax.process_index() == 0:
        directory = os.path.join(workdir, RESULTS_DIR)
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, f"results_step_{step}.json"), "w") as f:
            json.dump(results, f, indent=2, default=handle_non_serializable)
    logging.info("lm_eval at step %d: %s", step, found)
    return found
