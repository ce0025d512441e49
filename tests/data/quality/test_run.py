"""`python -m qwen_jax.data.quality` end to end, as the README writes it: the shipped recipes over
JSONL and Parquet input, outputs pandas reads, every removed document in `removed/` with its
reason, the report; a run killed with SIGKILL in the middle of model scoring resumes to the
uninterrupted run's output; bad input is one line."""

import json
import os
import signal
import subprocess
import time

import pandas as pd
import pytest
import readme_commands as readme
import train_runs
from test_model_scores import save_checkpoint

from qwen_jax.data import demo_corpus

SUMMARY_TIMINGS = ("seconds", "docs_per_s")


DEDUP = readme.command("python -m qwen_jax.data.quality --gin_file=configs/quality/dedup.gin")
FULL = readme.command("python -m qwen_jax.data.quality --gin_file=configs/quality/full.gin")


def quality(*params, readme_command=DEDUP, cwd=train_runs.REPO_ROOT, wait=True):
    """The README's command with `params` bound after its own (later bindings win)."""
    program, _ = readme.split(readme_command)
    command = [*program, *(f"--gin_param={p}" for p in params)]
    kwargs = dict(cwd=cwd, env=train_runs.env(), text=True)
    if not wait:
        return subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kwargs
        )
    return subprocess.run(command, capture_output=True, timeout=600, **kwargs)


def _corpus(directory):
    """Demo documents with planted noise: exact copies (other case), near copies, boilerplate."""
    docs = demo_corpus.demo_records("pretrain.jsonl", seed=0, scale=0.02)
    rows = [{"text": d["text"], "id": str(i)} for i, d in enumerate(docs)]
    rows.append({"text": docs[0]["text"].upper(), "id": "exact"})
    rows.append({"text": docs[1]["text"] + " extra", "id": "near"})
    rows.append({"text": "Accept cookies. " * 40, "id": "boilerplate"})
    os.makedirs(directory, exist_ok=True)
    half = len(rows) // 2
    demo_corpus.write_jsonl(os.path.join(directory, "a.jsonl"), rows[:half])
    with open(os.path.join(directory, "a.jsonl"), "a") as f:
        f.write("{not json\n")
    pd.DataFrame(rows[half:]).to_parquet(os.path.join(directory, "b.parquet"))
    return rows


def _read(pattern):
    import glob

    frames = [
        pd.read_parquet(p) if p.endswith(".parquet") else pd.read_json(p, lines=True)
        for p in sorted(glob.glob(pattern))
    ]
    return pd.concat(frames, ignore_index=True)


def test_dedup_recipe_over_jsonl_and_parquet(tmp_path):
    rows = _corpus(tmp_path / "raw")
    out = tmp_path / "clean"  # the README's OUTPUT
    result = quality(
        "INPUT=['raw/*.jsonl', 'raw/*.parquet']", "OUTPUT_FORMAT='parquet'", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    kept, removed = _read(f"{out}/part-*.parquet"), _read(f"{out}/removed/part-*.parquet")
    assert len(kept) + len(removed) == len(rows) + 1  # and the malformed line
    reasons = dict(zip(removed["id"], removed["removed_by"]))
    assert reasons["exact"] == "exact_dedup/duplicate"
    assert reasons["near"] == "near_dedup/near_duplicate"
    assert "input/bad_record" in set(removed["removed_by"])
    assert set(kept.columns) >= {"text", "id", "dup_cluster"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["kept"] == len(kept) and summary["removed"] == len(removed)
    assert (out / summary["plots"]["dup_jaccard"]).is_file()
    assert f"{len(kept)} kept" in result.stdout


def _outputs(out):
    files = {}
    for root, _, names in os.walk(out):
        for name in names:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, out)
            if rel.startswith((".quality_state", "report")):
                continue
            files[rel] = open(path, "rb").read()
    summary = json.loads(files.pop("summary.json"))
    for stage in summary["stages"].values():
        for key in SUMMARY_TIMINGS:
            stage.pop(key)
    return files, summary


def test_killed_scoring_run_resumes_to_the_uninterrupted_output(tmp_path):
    _corpus(tmp_path / "raw")
    # The README's model paths, as random tiny models over the demo vocabulary.
    save_checkpoint(tmp_path / "ckpt" / "qwen2.5-0.5b", seed=0)
    save_checkpoint(tmp_path / "ckpt" / "qwen2.5-0.5b-instruct", seed=1)
    params = [
        "run.QualityConfig.chunk_size=6",
        "SCORE_BATCH_SIZE=4",
        "model_scores.Perplexity.max_tokens=64",
        "model_scores.QualityRating.max_tokens=32",
        # The demo's short documents would fail the web-text rules; these runs are about scores.
        "heuristics.GopherQuality.min_words=1",
        "heuristics.C4Rules.min_terminal_punctuation_lines=0",
        "heuristics.C4Rules.min_sentences=0",
    ]
    result = quality(*params, readme_command=FULL, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]

    out = tmp_path / "resumed"
    proc = quality(*params, f"OUTPUT='{out}'", readme_command=FULL, cwd=tmp_path, wait=False)
    deadline = time.time() + 300
    while not (out / ".quality_state" / "chunk-00001.pkl").exists():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "summary.json").exists()  # it was stopped before the end
    result = quality(*params, f"OUTPUT='{out}'", readme_command=FULL, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]

    reference_files, reference_summary = _outputs(tmp_path / "scored")
    files, summary = _outputs(out)
    assert files.keys() == reference_files.keys()
    for name in files:
        assert files[name] == reference_files[name], name
    assert summary == reference_summary
    kept = _read(f"{out}/part-*.jsonl")
    assert {"perplexity", "perplexity_nll", "quality_rating", "dup_cluster"} <= set(kept.columns)
    assert kept["quality_rating"].between(0, 5).all()


@pytest.mark.parametrize(
    "params,message",
    [
        (["INPUT='{tmp}/nothing/*.jsonl'", "OUTPUT='{tmp}/out'"], "no file matches"),
        (["INPUT='{tmp}/raw/*.jsonl'", "TEXT_FIELD='body'"], "a.jsonl:1: no field 'body'"),
        (["INPUT='{tmp}/raw/*.jsonl'", "OUTPUT='{tmp}/raw'"], "is not empty"),
        (
            ["INPUT='{tmp}/raw/*.jsonl'", "OUTPUT='{tmp}/out'", "OUTPUT_FORMAT='csv'"],
            "output_format must be one of",
        ),
        (
            ["INPUT='{tmp}/mixed.jsonl'", "OUTPUT='{tmp}/out'", "OUTPUT_FORMAT='parquet'"],
            "field 'id' holds int and str values",
        ),
    ],
)
def test_bad_input_is_one_line(tmp_path, params, message):
    _corpus(tmp_path / "raw")
    demo_corpus.write_jsonl(
        tmp_path / "mixed.jsonl", [{"text": "a", "id": 1}, {"text": "b", "id": "x"}]
    )
    result = quality(*(p.format(tmp=tmp_path) for p in params), cwd=tmp_path)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not list(tmp_path.glob("out/**/part-*"))  # nothing half-written


def test_a_missing_model_is_one_line_and_nothing_is_written(tmp_path):
    _corpus(tmp_path / "raw")
    result = quality("REFERENCE_MODEL='ckpt/none'", readme_command=FULL, cwd=tmp_path)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last == "error: Perplexity.checkpoint=ckpt/none: no such directory", last
    assert not (tmp_path / "scored").exists()
