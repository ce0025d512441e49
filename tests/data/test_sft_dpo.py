"""SFT packing of conversations and DPO pair construction."""

import json

import numpy as np

from qwen_jax.data import pipeline
from qwen_jax.data.chat import render_chat
from qwen_jax.data.examples import PreferenceToExample


def test_sft_rows_pack_conversations_with_loss_on_answers(demo_dir, demo_tokenizer):
    t = demo_tokenizer
    it = pipeline.sft_iterator(
        str(demo_dir / "chat_train.jsonl"),
        t,
        seq_len=128,
        batch_size=4,
        seed=0,
        system_prompt="Be brief.",
    )
    batch = next(it)
    assert {k: (v.shape, v.dtype.name) for k, v in batch.items()} == {
        "inputs": ((4, 128), "int32"),
        "targets": ((4, 128), "int32"),
        "loss_mask": ((4, 128), "float32"),
        "segment_ids": ((4, 128), "int32"),
        "positions": ((4, 128), "int32"),
    }
    assert batch["segment_ids"].max() >= 2  # several conversations per row
    for row in range(4):
        seg = batch["segment_ids"][row]
        for s in range(1, seg.max() + 1):
            inputs, targets = batch["inputs"][row][seg == s], batch["targets"][row][seg == s]
            mask = batch["loss_mask"][row][seg == s]
            text = t.decode(np.concatenate([inputs[:1], targets]))
            # The record's own system message, or the configured one when it has none.
            assert text.startswith(
                (
                    "<|im_start|>system\nBe brief.<|im_end|>\n",
                    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n",
                )
            )
            # Learned targets are exactly the answers, each closed by <|im_end|>.
            learned = t.decode(targets[mask == 1])
            answers = [a.split("<|im_end|>")[0] for a in text.split("<|im_start|>assistant\n")[1:]]
            assert learned == "".join(a + "<|im_end|>" for a in answers)


def test_sft_eval_is_one_padded_pass(demo_dir, demo_tokenizer):
    n_conversations = sum(1 for _ in open(demo_dir / "chat_eval.jsonl"))
    batches = list(
        pipeline.sft_iterator(
            str(demo_dir / "chat_eval.jsonl"),
            demo_tokenizer,
            seq_len=256,
            batch_size=8,
            for_eval=True,
        )
    )
    assert all(b["inputs"].shape == (8, 256) for b in batches)
    segments = sum(len(np.unique(r[r > 0])) for b in batches for r in b["segment_ids"])
    assert segments == n_conversations
    examples = list(
        pipeline.generation_eval_examples(
            str(demo_dir / "chat_eval.jsonl"), demo_tokenizer, system_prompt=None
        )
    )
    assert len(examples) == n_conversations
    first = json.loads(open(demo_dir / "chat_eval.jsonl").readline())["messages"]
    assert examples[0]["answer"] == first[-1]["content"]
    assert demo_tokenizer.decode(examples[0]["prompt_ids"]).endswith("<|im_start|>assistant\n")


def test_dpo_pairs_share_the_prompt_and_truncate(demo_tokenizer):
    t = demo_tokenizer
    make = PreferenceToExample(t, prompt_len=12, response_len=6, system_prompt="Be brief.")
    doc = {
        "prompt": "What is the capital of Zorvia and also of many other places?",
        "chosen": "Quell",
        "rejected": "Not a city I know of, sorry, very long answer",
    }
    row = make(doc)
    prompt_ids, _ = render_chat(
        [{"role": "user", "content": doc["prompt"]}],
        t,
        add_generation_prompt=True,
        system_prompt="Be brief.",
    )
    kept_prompt = prompt_ids[-12:]  # truncated from the left
    for name, response in (("chosen", "Quell"), ("rejected", doc["rejected"])):
        response_ids = (t.encode(response) + [t.im_end_id])[:6]  # truncated from the right
        seq = np.concatenate([kept_prompt, response_ids])
        n = len(seq) - 1
        np.testing.assert_array_equal(row[f"{name}_inputs"][:n], seq[:-1])
        np.testing.assert_array_equal(row[f"{name}_targets"][:n], seq[1:])
        mask = row[f"{name}_loss_mask"]
        assert t.decode(row[f"{name}_targets"][mask == 1]) == t.decode(response_ids)
        assert mask[:11].sum() == 0 and mask.sum() == len(response_ids)
        assert row[f"{name}_segment_ids"].tolist() == [1] * n + [0] * (18 - n)
        assert row[f"{name}_positions"][:n].tolist() == list(range(n))
    assert row["chosen_inputs"].shape == (18,)


def test_dpo_batches_keep_pairs_on_the_same_row(demo_dir, demo_tokenizer):
    t = demo_tokenizer
    it = pipeline.dpo_iterator(
        str(demo_dir / "preference_train.jsonl"),
        t,
        prompt_len=48,
        response_len=8,
        batch_size=4,
        seed=0,
        system_prompt=None,
    )
    batch = next(it)
    pairs = {
        (r["prompt"], r["chosen"] + "<|im_end|>", r["rejected"] + "<|im_end|>")
        for r in map(json.loads, open(demo_dir / "preference_train.jsonl"))
    }
    for row in range(4):
        chosen = t.decode(batch["chosen_inputs"][row][batch["chosen_segment_ids"][row] > 0])
        rejected = t.decode(batch["rejected_inputs"][row][batch["rejected_segment_ids"][row] > 0])
        question = chosen.split("<|im_start|>user\n")[1].split("<|im_end|>")[0]
        assert question == rejected.split("<|im_start|>user\n")[1].split("<|im_end|>")[0]
        c = t.decode(batch["chosen_targets"][row][batch["chosen_loss_mask"][row] == 1])
        r = t.decode(batch["rejected_targets"][row][batch["rejected_loss_mask"][row] == 1])
        assert (question, c, r) in pairs
