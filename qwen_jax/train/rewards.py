"""Reward functions for GRPO, called as TRL calls them:

    fn(prompts, completions, completion_ids, **fields) -> list[float | None]

one value per completion; `fields` holds every other field of each completion's prompt record
(e.g. `answer`), one list per field. Completions are strings, or, when the prompt is a list of
messages, `[{"role": "assistant", "content": text}]` as TRL gives them, so a function written for
TRL runs unchanged. `None` means the function does not apply to that completion. A function may
say which record fields it reads in a `fields` attribute; the prompt data is then checked for
them before training starts.

Any such callable can be listed in `GRPOTask.reward_functions`; in gin, built-ins are
`@rewards.ExactMatch()`, `@rewards.FormatMatch()` and `@rewards.LengthPenalty()`, and a user's
own function is made bindable with `gin.external_configurable` in a module the gin file imports.
A function's name in the logs (`rewards/<name>/mean`) is its `name` attribute, else `__name__`.
"""

from __future__ import annotations

import dataclasses
import math
import re
import unicodedata
from collections.abc import Sequence

# An optionally signed number with thousands separators and decimals: "-1,234.5", "42", "3.".
_NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?")


def completion_text(completion) -> str:
    """The text of a completion as reward functions receive it (string or TRL message list)."""
    if isinstance(completion, str):
        return completion
    return "".join(m.get("content") or "" for m in completion)


def final_number(text: str) -> float | None:
    """The last number in `text` (thousands commas dropped), or None."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:  # e.g. "1,,"
        return None


def normalize_answer(text: str) -> str | float:
    """How ExactMatch compares: the final number when there is one (so "The answer is 5.",
    "5" and "#### 5" agree), else the text NFKC-normalized, casefolded, with whitespace collapsed
    and surrounding punctuation stripped."""
    number = final_number(text)
    if number is not None:
        return number
    text = " ".join(unicodedata.normalize("NFKC", text).casefold().split())
    return text.strip(" .,;:!?\"'`")


def name_of(fn) -> str:
    return getattr(fn, "name", None) or getattr(fn, "__name__", type(fn).__name__)


@dataclasses.dataclass(frozen=True)
class ExactMatch:
    """1.0 when the completion's answer equals the record's (`normalize_answer` on both), else
    0.0; None for a record without an answer."""

    answer_field: str = "answer"
    name: str = "exact_match"

    @property
    def fields(self) -> tuple[str, ...]:
        return (self.answer_field,)

    def __call__(self, prompts, completions, completion_ids=None, **fields):
        answers = fields[self.answer_field]
        out = []
        for completion, answer in zip(completions, answers):
            if answer is None:
                out.append(None)
                continue
            got, want = normalize_answer(completion_text(completion)), normalize_answer(str(answer))
            if isinstance(got, float) and isinstance(want, float):
                out.append(float(math.isclose(got, want, rel_tol=0, abs_tol=1e-9)))
            else:
                out.append(float(got == want))
        return out


@dataclasses.dataclass(frozen=True)
class FormatMatch:
    """1.0 when the whole completion (surrounding whitespace aside) matches `pattern` (Python
    regular expression, `.` matching newlines too), else 0.0."""

    pattern: str = r"[-+]?\d+\.?"
    name: str = "format"

    def __post_init__(self):
        try:
            re.compile(self.pattern)
        except re.error as e:
            raise ValueError(f"FormatMatch.pattern {self.pattern!r}: {e}") from None

    def __call__(self, prompts, completions, completion_ids=None, **fields):
        regex = re.compile(self.pattern, re.DOTALL)
        return [float(regex.fullmatch(completion_text(c).strip()) is not None) for c in completions]


@dataclasses.dataclass(frozen=True)
class LengthPenalty:
    """DAPO's soft overlong punishment on completion tokens L: 0 up to `max_length - buffer`,
    then falling linearly to -1 at `max_length`, and -1 beyond."""

    max_length: int = 256
    buffer: int = 64
    name: str = "length_penalty"

    def __post_init__(self):
        if not 0 < self.buffer <= self.max_length:
            raise ValueError(
                f"LengthPenalty: buffer {self.buffer} must be in (0, max_length {self.max_length}]"
            )

    def __call__(self, prompts, completions, completion_ids: Sequence[Sequence[int]], **fields):
        free = self.max_length - self.buffer
        return [max(-1.0, min(0.0, (free - len(ids)) / self.buffer)) for ids in completion_ids]
