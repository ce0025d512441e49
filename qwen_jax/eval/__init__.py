"""Evaluation with EleutherAI's lm-evaluation-harness (the `eval` extra).

- `harness`: the `qwen_jax` model for lm-eval (loglikelihood, rolling loglikelihood, generation).
- `scoring`: the batched, sharded forward passes and decoding behind it (no lm-eval import).
- `__main__`: `python -m qwen_jax.eval`, lm-eval's command line with `qwen_jax` registered.
- `in_loop`: lm-eval tasks on the current parameters every N training steps.
- `demo_tasks`: local task definitions built from the demo corpus (no download).
"""
