"""`python -m qwen_jax.eval [lm-eval's flags]`: lm-eval's own command line with the `qwen_jax`
model registered (lm-eval finds no third-party model by itself), e.g.

    python -m qwen_jax.eval --model qwen_jax --model_args pretrained=DIR,dtype=float32 \
      --tasks T --include_path TASKS --num_fewshot 0 --limit 50 --log_samples --output_path OUT

Every lm-eval flag works as with `lm_eval`, and so do its other models (`--model hf`). Bad input
(an unknown task, a missing checkpoint, a tokenizer of another model) ends with one `error:`
line and exit status 1; the traceback goes to the log at debug level.
"""

from __future__ import annotations

import logging
import sys


def main() -> int:
    from lm_eval.__main__ import cli_evaluate

    from qwen_jax.eval import harness  # noqa: F401  (registers --model qwen_jax)

    try:
        cli_evaluate()
    except (ValueError, OSError, KeyError, RuntimeError) as e:
        logging.getLogger(__name__).debug("error", exc_info=True)
        message = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
        print(f"error: {message or type(e).__name__}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
