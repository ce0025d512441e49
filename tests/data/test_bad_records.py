"""Bad input is counted per source, reported with file:line, and fails the run past a threshold."""

import json
import logging

import pytest

from qwen_jax.data import pipeline
from qwen_jax.data.bad_records import BadInputError, BadRecordTracker
from qwen_jax.data.config import DataStage, Source

BAD_LINES = {
    3: b"{not json\n",
    5: b'{"text": "caf\xe9"}\n',  # Latin-1 byte: not UTF-8
    8: b'{"text": "   "}\n',
    11: b'{"body": "no text field"}\n',
    13: b"\n",
}


def write_text_file(path, n, bad_lines):
    with open(path, "wb") as f:
        for i in range(1, n + 1):
            f.write(bad_lines.get(i, json.dumps({"text": f"document {i}"}).encode() + b"\n"))


def _docs(sources, kind="text"):
    tracker = BadRecordTracker({s.name: s.max_bad_fraction for s in sources}, min_records=1000)
    ds = pipeline.document_dataset(
        sources,
        None,
        kind,
        seed=0,
        shard_index=0,
        shard_count=1,
        num_epochs=1,
        shuffle=False,
        tracker=tracker,
    )
    return ds, tracker


def test_bad_records_are_counted_and_reported(tmp_path, caplog):
    path = tmp_path / "a.jsonl"
    write_text_file(path, 1000, BAD_LINES)
    source = Source("web", str(path), max_bad_fraction=0.01)
    ds, tracker = _docs([source])
    with caplog.at_level(logging.WARNING):
        docs = list(ds)
    assert len(docs) == 995
    tally = tracker.tallies["web"]
    assert (tally.seen, tally.bad) == (1000, 5)
    assert tally.reasons == {
        "malformed JSON": 1,
        "non-UTF-8 bytes": 1,
        "empty document": 1,
        "missing field": 1,
        "empty line": 1,
    }
    assert [loc for loc, _ in tally.examples] == [f"{path}:{i}" for i in sorted(BAD_LINES)]
    assert f"{path}:3" in caplog.text and "malformed JSON" in caplog.text
    assert "web: 1000 records, 5 bad (0.50%)" in tracker.summary()


def test_threshold_fails_naming_the_source(tmp_path):
    path = tmp_path / "b.jsonl"
    write_text_file(path, 300, BAD_LINES)  # 5 of 300 bad: 1.7% > 1%
    ds, _ = _docs([Source("books", str(path))])
    with pytest.raises(BadInputError, match=r"Source 'books': 5 of 300 records are bad.*b.jsonl:3"):
        list(ds)
    # A looser threshold lets the same file through.
    ds, tracker = _docs([Source("books", str(path), max_bad_fraction=0.05)])
    assert len(list(ds)) == 295 and tracker.tallies["books"].bad == 5


def test_threshold_fails_a_training_stream(tmp_path, demo_tokenizer):
    path = tmp_path / "c.jsonl"
    write_text_file(path, 400, {i: b"{oops\n" for i in range(1, 400, 20)})  # 5% bad
    it = pipeline.pretrain_iterator(
        [Source("web", str(path))],
        [DataStage("s", None, 32, 2, {"web": 1.0})],
        demo_tokenizer,
        shard_index=0,
        shard_count=1,
        prefetch=0,
        min_records_for_bad_check=100,
    )
    with pytest.raises(BadInputError, match="Source 'web'"):
        for _ in range(500):
            next(it)


def test_bad_chat_and_preference_records(tmp_path):
    chats = tmp_path / "chat.jsonl"
    chats.write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {
                    "messages": [
                        {"role": "user", "content": "hi"},
                        {"role": "assistant", "content": "yo"},
                    ]
                },
                {"messages": [{"role": "wizard", "content": "hi"}]},
                {"messages": [{"role": "user"}]},
                {"conversation": []},
            ]
        )
        + "\n"
    )
    ds, tracker = _docs(
        [Source("chat", str(chats), field="messages", max_bad_fraction=1.0)], "messages"
    )
    assert len(list(ds)) == 1
    assert tracker.tallies["chat"].reasons == {"unknown role": 1, "missing field": 2}
    prefs = tmp_path / "pref.jsonl"
    prefs.write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {"prompt": "q", "chosen": "a", "rejected": "b"},
                {"prompt": "q", "chosen": "a"},
                {"prompt": "q", "chosen": "", "rejected": "b"},
            ]
        )
        + "\n"
    )
    ds, tracker = _docs(
        [Source("pref", str(prefs), field="prompt/chosen/rejected", max_bad_fraction=1.0)],
        "preference",
    )
    assert len(list(ds)) == 1
    assert tracker.tallies["pref"].reasons == {"missing field": 1, "empty document": 1}
