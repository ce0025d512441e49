"""Data quality before training: deduplication, heuristic filters and model-based scores.

`python -m qwen_jax.data.quality --gin_file=configs/quality/full.gin` composes the stages of
`dedup`, `heuristics` and `model_scores`; `run` reads the sources the training pipeline reads
and writes shards that keep every input field plus what each stage adds; `report` summarises.
"""
