"""The tokenizer wrapper, the committed demo tokenizer, and the demo corpus generator."""

import json

from qwen_jax.data import demo_corpus
from qwen_jax.data.train_tokenizer import DEMO_TOKENIZER_PATH, demo_tokenizer_json


def test_demo_tokenizer_regenerates_byte_for_byte():
    with open(DEMO_TOKENIZER_PATH, encoding="utf-8") as f:
        assert f.read() == demo_tokenizer_json()


def test_demo_tokenizer_ids(demo_tokenizer):
    t = demo_tokenizer
    assert 512 <= t.vocab_size <= 2048 + 22
    assert {t.eos_id, t.im_start_id, t.im_end_id} == {
        t.token_id("<|endoftext|>"),
        t.token_id("<|im_start|>"),
        t.token_id("<|im_end|>"),
    }
    assert t.pad_id == t.eos_id
    text = "The capital of Zorvia is Quell.\n12 + 7 = 19 ünïcode"
    ids = t.encode(text)
    assert t.decode(ids) == text
    assert t.encode("<|im_start|>user\n")[0] == t.im_start_id
    assert t.encode_batch([text, "a"]) == [ids, t.encode("a")]


def test_qwen_tokenizer_known_ids(qwen_tokenizer):
    t = qwen_tokenizer
    assert (t.eos_id, t.pad_id, t.im_start_id, t.im_end_id) == (151643, 151643, 151644, 151645)
    assert t.vocab_size == 151665
    assert t.encode("Hello, world!") == [9707, 11, 1879, 0]


def test_demo_corpus_is_deterministic_and_consistent(tmp_path):
    a = demo_corpus.write_demo_data(tmp_path / "a", seed=3, scale=0.1)
    b = demo_corpus.write_demo_data(tmp_path / "b", seed=3, scale=0.1)
    for name in a:
        assert open(a[name], "rb").read() == open(b[name], "rb").read(), name
    world = {c.name: c for c in demo_corpus.make_world(3)}
    for line in open(a["chat_eval.jsonl"], encoding="utf-8"):
        messages = json.loads(line)["messages"]
        for q, ans in zip(messages, messages[1:]):
            if q["role"] == "user" and q["content"].startswith("What is the capital of "):
                assert (
                    world[q["content"][len("What is the capital of ") : -1]].capital
                    == ans["content"]
                )
            if q["role"] == "user" and "+" in q["content"]:
                x, y = q["content"][len("What is ") : -1].split(" + ")
                assert int(ans["content"]) == int(x) + int(y)
    pref = [json.loads(line) for line in open(a["preference_train.jsonl"], encoding="utf-8")]
    assert all(p["chosen"] != p["rejected"] for p in pref)
    # Arithmetic pairs: the chosen answer is the right result as a sentence ("5."); the rejected
    # one is the right result bare ("5") or the other operation's result as a sentence.
    for p in pref:
        x, op, y = p["prompt"][len("What is ") : -1].split()
        right = int(x) + int(y) if op == "+" else int(x) - int(y)
        other = int(x) - int(y) if op == "+" else int(x) + int(y)
        assert p["chosen"] == f"{right}.", p
        assert p["rejected"] in (str(right), f"{other}.", f"{other + 1}."), p
    assert {p["rejected"].endswith(".") for p in pref} == {True, False}

    # Eval questions never occur in the train splits.
    def questions(name, key):
        for line in open(a[name], encoding="utf-8"):
            record = json.loads(line)
            if key == "messages":
                yield from (m["content"] for m in record["messages"] if m["role"] == "user")
            else:
                yield record["prompt"]

    for train, held_out, key in (
        ("chat_train.jsonl", "chat_eval.jsonl", "messages"),
        ("preference_train.jsonl", "preference_eval.jsonl", "prompt"),
    ):
        assert not set(questions(train, key)) & set(questions(held_out, key))
        assert all(demo_corpus.is_held_out(q) for q in questions(held_out, key))
    # Pre-training text states every question's answer, held-out questions included.
    pretrain = open(a["pretrain.jsonl"], encoding="utf-8").read()
    assert any(
        demo_corpus.is_held_out(q) and f"Q: {q}\\nA: " in pretrain
        for q in questions("chat_eval.jsonl", "messages")
    )
