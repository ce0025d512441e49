"""The built-in reward functions and how GRPOTask calls and checks reward functions."""

import math

import numpy as np
import pytest

from qwen_jax.train import rewards
from qwen_jax.train.grpo_task import GRPOTask


@pytest.mark.parametrize(
    "completion,answer,want",
    [
        ("5", "5", 1.0),
        ("The answer is 5.", "5", 1.0),
        ("5.0", "5", 1.0),
        ("so 3 + 4 = 7", "7", 1.0),  # the final number counts
        ("7, not 3", "7", 0.0),
        ("-3", "3", 0.0),
        ("1,234", "#### 1234", 1.0),  # GSM8K's answer style
        ("Paris.", "paris", 1.0),  # no number: normalized text
        ("  PARIS ", "Paris!", 1.0),
        ("Lyon", "Paris", 0.0),
        ("", "5", 0.0),
    ],
)
def test_exact_match_normalizes_numbers_and_text(completion, answer, want):
    assert rewards.ExactMatch()([None], [completion], answer=[answer]) == [want]


def test_exact_match_reads_trl_message_completions_and_skips_missing_answers():
    fn = rewards.ExactMatch(answer_field="solution")
    completions = [[{"role": "assistant", "content": "It is 12."}], "12"]
    assert fn([[], []], completions, solution=["12", None]) == [1.0, None]
    assert fn.fields == ("solution",)


def test_format_match_is_a_full_match_of_the_stripped_completion():
    fn = rewards.FormatMatch(pattern=r"<answer>\d+</answer>")
    got = fn(None, ["<answer>4</answer>\n", "x <answer>4</answer>", "<answer>four</answer>"])
    assert got == [1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="FormatMatch.pattern"):
        rewards.FormatMatch(pattern="(")


def test_length_penalty_is_dapos_soft_overlong_punishment():
    fn = rewards.LengthPenalty(max_length=10, buffer=4)
    ids = [[0] * n for n in (3, 6, 8, 10, 12)]
    np.testing.assert_allclose(fn(None, [""] * 5, ids), [0.0, 0.0, -0.5, -1.0, -1.0])


def _task(*functions, weights=None):
    return GRPOTask(
        "unused.jsonl",
        functions,
        batch_size=2,
        max_prompt_len=8,
        max_new_tokens=4,
        reward_weights=weights,
    )


RECORDS = [
    {"prompt": "What is 2 + 2?", "loc": "p.jsonl:1", "fields": {"answer": "4"}},
    {
        "prompt": [{"role": "user", "content": "2 + 3?"}],
        "loc": "p.jsonl:2",
        "fields": {"answer": "5"},
    },
]


def test_score_gives_trl_arguments_and_nan_for_none():
    seen = {}

    def spy(prompts, completions, completion_ids, **fields):
        seen.update(prompts=prompts, completions=completions, ids=completion_ids, **fields)
        return [None, 2.5]

    task = _task(rewards.ExactMatch(), spy, weights=[1.0, 0.5])
    got = task.score(RECORDS, ["4", "6"], [[1], [2, 3]])
    assert task.reward_names == ["exact_match", "spy"]
    np.testing.assert_array_equal(got[:, 0], [1.0, 0.0])
    assert math.isnan(got[0, 1]) and got[1, 1] == 2.5
    assert seen["completions"] == ["4", [{"role": "assistant", "content": "6"}]]
    assert seen["answer"] == ["4", "5"] and seen["ids"] == [[1], [2, 3]]
    assert seen["prompts"] == [r["prompt"] for r in RECORDS]
    assert task.required_fields == {"answer": "reward function 'exact_match'"}


@pytest.mark.parametrize(
    "returned,message",
    [
        ([1.0], "returned list of length 1; expected a list of 2"),
        (["a", 1], "returned 'a' for p.jsonl:1"),
    ],
)
def test_score_refuses_a_function_that_returns_the_wrong_thing(returned, message):
    def broken(prompts, completions, **fields):
        return returned

    with pytest.raises(ValueError, match=message):
        _task(broken).score(RECORDS, ["4", "5"], [[1], [2]])


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"reward_functions": []}, "reward_functions is empty"),
        ({"reward_weights": [1.0, 2.0]}, "2 reward_weights for 1 reward functions"),
        ({"max_new_tokens": 2000}, "do not split into loss chunks"),
    ],
)
def test_task_refuses_bad_settings(kwargs, message):
    settings = dict(
        source="p.jsonl",
        reward_functions=[rewards.ExactMatch()],
        batch_size=2,
        max_prompt_len=8,
        max_new_tokens=4,
    )
    with pytest.raises(ValueError, match=message):
        GRPOTask(**{**settings, **kwargs})
