"""The report of a quality run: `summary.json` (counts kept and removed per stage and per rule,
throughput, score statistics) and `report/<field>.png`, a histogram of each score."""

from __future__ import annotations

import json
import os

import numpy as np

REPORT_DIR = "report"
SUMMARY = "summary.json"


def _statistics(values: list[float]) -> dict:
    x = np.asarray(values, np.float64)
    x = x[np.isfinite(x)]
    if not x.size:
        return {"count": 0}
    quantiles = np.quantile(x, [0.1, 0.25, 0.5, 0.75, 0.9])
    return {
        "count": int(x.size),
        "mean": float(x.mean()),
        "min": float(x.min()),
        "max": float(x.max()),
        **{f"p{q}": float(v) for q, v in zip((10, 25, 50, 75, 90), quantiles)},
    }


def summarize(config, tally) -> dict:
    stages = {}
    for stage in config.stages:
        seen, seconds = tally.stage_seen[stage.name], tally.stage_seconds[stage.name]
        stages[stage.name] = {
            "seen": seen,
            "removed": tally.stage_removed[stage.name],
            "seconds": round(seconds, 3),
            "docs_per_s": round(seen / seconds, 1) if seconds else None,
        }
    return {
        "documents": tally.documents,
        "kept": tally.kept,
        "removed": tally.documents - tally.kept,
        "chunks": tally.chunks,
        "stages": stages,
        "rules": dict(sorted(tally.by_rule.items())),
        "scores": {field: _statistics(v) for field, v in sorted(tally.scores.items())},
    }


def write(output: str, summary: dict, scores: dict[str, list[float]]) -> None:
    """summary.json and one histogram PNG per score field."""
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    directory = os.path.join(output, REPORT_DIR)
    os.makedirs(directory, exist_ok=True)
    plots = {}
    for field, values in sorted(scores.items()):
        x = np.asarray(values, np.float64)
        x = x[np.isfinite(x)]
        if not x.size:
            continue
        figure, axes = plt.subplots(figsize=(6, 3.5))
        axes.hist(x, bins=50)
        axes.set_xlabel(field)
        axes.set_ylabel("documents")
        axes.set_title(f"{field}: {x.size} documents, median {np.median(x):.3g}")
        figure.tight_layout()
        path = os.path.join(directory, f"{field}.png")
        figure.savefig(path, dpi=100)
        plt.close(figure)
        plots[field] = os.path.relpath(path, output)
    with open(os.path.join(output, SUMMARY), "w") as f:
        json.dump({**summary, "plots": plots}, f, indent=1)
