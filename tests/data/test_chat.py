"""ChatML rendering against the official Qwen2.5 template rules, and its loss mask."""

import numpy as np
import pytest

from qwen_jax.data.bad_records import BadRecord
from qwen_jax.data.chat import DEFAULT_SYSTEM_PROMPT, render_chat

CONVERSATION = [
    {"role": "user", "content": "What is 12 + 7?"},
    {"role": "assistant", "content": "19"},
    {"role": "user", "content": "And the capital of Zorvia?\n\n Think."},
    {"role": "assistant", "content": "Quell, of course.\n"},
]
# An assistant reply opening with a newline: the tokenizer merges it with the header's newline.
EDGE = CONVERSATION[:3] + [{"role": "assistant", "content": "\n\nQuell."}]


def template(messages, add_generation_prompt=False, system=DEFAULT_SYSTEM_PROMPT):
    """The official template's string, written from its rules (README of shared tokenizers)."""
    text = ""
    if messages[0]["role"] != "system":
        text += f"<|im_start|>system\n{system}<|im_end|>\n"
    for m in messages:
        text += f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"
    if add_generation_prompt:
        text += "<|im_start|>assistant\n"
    return text


def test_literal_ids(qwen_tokenizer):
    assert qwen_tokenizer.encode("<|im_start|>user\nhi<|im_end|>\n") == [
        151644,
        872,
        198,
        6023,
        151645,
        198,
    ]
    ids, _ = render_chat(
        [{"role": "system", "content": "x"}, {"role": "user", "content": "hi"}], qwen_tokenizer
    )
    assert list(ids[-6:]) == [151644, 872, 198, 6023, 151645, 198]


@pytest.mark.parametrize("with_system", [False, True])
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_matches_official_template(qwen_tokenizer, with_system, add_generation_prompt):
    for messages in (list(CONVERSATION), list(EDGE)):
        check_template(qwen_tokenizer, messages, with_system, add_generation_prompt)


def check_template(qwen_tokenizer, messages, with_system, add_generation_prompt):
    if with_system:
        messages = [{"role": "system", "content": "Be terse."}] + messages
    ids, mask = render_chat(messages, qwen_tokenizer, add_generation_prompt=add_generation_prompt)
    expected = qwen_tokenizer.encode(template(messages, add_generation_prompt))
    assert ids.tolist() == expected
    assert ids.dtype == np.int32 and mask.dtype == np.float32 and mask.shape == ids.shape


def test_default_system_prompt_is_qwens_and_configurable(qwen_tokenizer):
    ids, _ = render_chat(CONVERSATION[:2], qwen_tokenizer)
    assert qwen_tokenizer.decode(ids).startswith(
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
        "<|im_end|>\n<|im_start|>user\n"
    )
    ids, _ = render_chat(CONVERSATION[:2], qwen_tokenizer, system_prompt="Short.")
    assert qwen_tokenizer.decode(ids).startswith("<|im_start|>system\nShort.<|im_end|>\n")
    ids, _ = render_chat(CONVERSATION[:2], qwen_tokenizer, system_prompt=None)
    assert qwen_tokenizer.decode(ids).startswith("<|im_start|>user\n")


def test_loss_mask_covers_exactly_assistant_turns(qwen_tokenizer):
    t = qwen_tokenizer
    ids, mask = render_chat(CONVERSATION, t)
    # Rebuild the expected mask turn by turn: only assistant content and its <|im_end|>.
    spans = []
    ids_list = ids.tolist()
    header = [t.im_start_id] + t.encode("assistant\n")
    for start in range(len(ids_list)):
        if ids_list[start : start + len(header)] == header:
            end = ids_list.index(t.im_end_id, start)
            spans.append((start + len(header), end + 1))
    assert len(spans) == 2
    expected = np.zeros(len(ids), np.float32)
    for a, b in spans:
        expected[a:b] = 1
    np.testing.assert_array_equal(mask, expected)
    learned = t.decode(ids[mask == 1])
    assert learned == "19<|im_end|>Quell, of course.\n<|im_end|>"
    # Neither the header nor the trailing newline after <|im_end|> is learned.
    for a, b in spans:
        assert mask[a - 1] == 0 and mask[b] == 0 and ids[b] == 198


def test_tool_turns_follow_the_official_template(qwen_tokenizer):
    t = qwen_tokenizer
    messages = [
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Quell"}}}],
        },
        {"role": "tool", "content": "sunny"},
        {"role": "tool", "content": "20C"},
        {"role": "assistant", "content": "Sunny, 20C."},
    ]
    ids, mask = render_chat(messages, t, system_prompt="S.")
    expected = (
        "<|im_start|>system\nS.<|im_end|>\n<|im_start|>user\nWeather?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": '
        '{"city": "Quell"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\nsunny\n</tool_response>\n<tool_response>\n20C\n"
        "</tool_response><|im_end|>\n<|im_start|>assistant\nSunny, 20C.<|im_end|>\n"
    )
    assert ids.tolist() == t.encode(expected)
    assert t.decode(ids[mask == 1]) == (
        '\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Quell"}}\n</tool_call>'
        "<|im_end|>Sunny, 20C.<|im_end|>"
    )


def test_merged_header_newline_takes_loss(qwen_tokenizer):
    ids, mask = render_chat(EDGE, qwen_tokenizer)
    assert qwen_tokenizer.decode(ids[mask == 1]).endswith("\n\n\nQuell.<|im_end|>")


@pytest.mark.parametrize(
    "messages,reason",
    [
        ([{"role": "narrator", "content": "x"}], "unknown role"),
        ([{"role": "user"}], "missing field"),
        ([], "bad messages"),
    ],
)
def test_bad_conversations(demo_tokenizer, messages, reason):
    with pytest.raises(BadRecord, match=reason):
        render_chat(messages, demo_tokenizer)
