"""Bad records through the real entry point: a mostly malformed file stops a short run at once,
naming the ratio and the first bad lines; a file at half the threshold trains, and the run's
closing summary (log and metrics.jsonl) counts its bad records exactly."""

import json


import train_runs as runs
from qwen_jax.data.train_tokenizer import DEMO_TOKENIZER_PATH


def _with_malformed_lines(source, target, *, records: int, every: int) -> int:
    """Writes `records` lines cycling over `source`'s, every `every`-th one cut in half (malformed
    JSON); returns how many are malformed."""
    lines = [line for line in open(source, encoding="utf-8") if line.strip()]
    bad = 0
    with open(target, "w", encoding="utf-8") as out:
        for i in range(records):
            line = lines[i % len(lines)].rstrip("\n")
            if (i + 1) % every == 0:
                line, bad = line[: len(line) // 2], bad + 1
            out.write(line + "\n")
    return bad


def test_a_30_percent_malformed_file_stops_a_10_step_run(tiny_pretrain_data, tmp_path):
    text = tmp_path / "text.jsonl"
    _with_malformed_lines(tiny_pretrain_data["pretrain.jsonl"], text, records=300, every=3)
    params = runs.tiny_pretrain(
        tiny_pretrain_data, f"PRETRAIN_TEXT = '{text}'", "setup.RunConfig.total_steps = 10"
    )
    result = runs.run(tmp_path / "w", runs.PRETRAIN_GIN, params, check=False)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 1 and len(errors) == 1, result.stderr[-3000:]
    assert "> max_bad_fraction 1.00%" in errors[0] and f"{text}:" in errors[0], errors[0]
    assert not (tmp_path / "w" / "checkpoints").exists() or not runs.checkpoint_steps(
        tmp_path / "w"
    )


def test_a_half_percent_malformed_file_trains_and_is_counted_exactly(tiny_pretrain_data, tmp_path):
    chat = tmp_path / "chat.jsonl"
    bad = _with_malformed_lines(
        tiny_pretrain_data["chat_train.jsonl"], chat, records=600, every=200
    )
    assert bad == 3  # 0.5%, half of the default max_bad_fraction
    runs.save_tiny_checkpoint(tmp_path / "init")
    params = [
        f"setup.RunConfig.tokenizer_path = '{DEMO_TOKENIZER_PATH}'",
        f"INIT_FROM = '{tmp_path / 'init'}'",
        f"CHAT_TRAIN = '{chat}'",
        f"CHAT_EVAL = '{tiny_pretrain_data['chat_eval.jsonl']}'",
        "SFT_STEPS = 1000",  # the one epoch of data ends the run first
        "tasks.SFTTask.num_epochs = 1",
        "tasks.SFTTask.exact_match_examples = 2",
        "setup.RunConfig.eval_at_start = False",
    ]
    result = runs.run(tmp_path / "w", ["configs/demo/sft.gin"], params)
    with open(tmp_path / "w" / "metrics.jsonl") as f:
        (summary,) = [r for r in map(json.loads, f) if r["split"] == "data"]
    assert summary["source0/records"] == 600 and summary["source0/bad"] == 3, summary
    assert summary["source0/bad/malformed JSON"] == 3, summary
    assert "source0/records=600 source0/bad=3" in result.stderr
