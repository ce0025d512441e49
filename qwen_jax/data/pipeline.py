"""Input pipelines for pre-training (staged mixtures), SFT, DPO and GRPO prompts, from Grain.

Every iterator yields dicts of numpy arrays for this host and implements Grain's
`get_state()`/`set_state()` (JSON-serializable), so the trainer stores it beside the model
checkpoint (`qwen_jax.checkpoint.manager`) and restores exactly the next batches.

Pipeline shape (per source, then shared):
  records (random access, host shard, per-epoch shuffle, repeat) -> to_iter_dataset (reader
  threads) -> parse and count bad records -> mix by weight -> tokenize (encode_batch) -> pack
  (Grain first-fit or concat-then-split) -> batch -> [mp_prefetch workers] -> thread prefetch.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence

import grain
import jax
import numpy as np
from absl import flags, logging

from qwen_jax.data import chat, documents, examples, packing, sources as sources_lib
from qwen_jax.data.bad_records import BadRecordTracker
from qwen_jax.data.config import DataStage, Source, check_stages
from qwen_jax.data.stages import StagedIterator
from qwen_jax.data.tokenizer import Tokenizer


def _sub_seed(seed: int, *keys) -> int:
    """A stable 31-bit seed per (seed, keys): every source and stage shuffles independently."""
    mixed = np.random.SeedSequence([seed] + [zlib.crc32(str(k).encode()) for k in keys])
    return int(mixed.generate_state(1)[0] & 0x7FFFFFFF)


def _shard(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
    index = jax.process_index() if shard_index is None else shard_index
    count = jax.process_count() if shard_count is None else shard_count
    return index, count


def _per_host(batch_size: int, shard_count: int, what: str) -> int:
    if batch_size % shard_count:
        raise ValueError(f"{what}: batch_size {batch_size} is not divisible by {shard_count} hosts")
    return batch_size // shard_count


def _as_sources(given, field: str) -> list[Source]:
    """Accepts a Source, a glob string, or a list of either (strings become sources of the format
    their suffix names: .parquet, .arrayrecord, else JSONL)."""
    items = given if isinstance(given, (list, tuple)) else [given]
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, Source):
            item = Source(f"source{i}", item, format=sources_lib.format_of(item), field=field)
        out.append(item)
    return out


class _ParsedIterator(grain.DatasetIterator):
    """Parses records into documents, skipping (and counting) bad ones; at the end of a finite
    stream, judges every source on all it has seen."""

    def __init__(self, parent: grain.DatasetIterator, parse: documents.ParseRecords):
        super().__init__(parent)
        self._parse = parse

    def __next__(self):
        while True:
            try:
                record = next(self._parent)
            except StopIteration:
                self._parse.tracker.finish()
                raise
            doc = self._parse(record)
            if doc is not None:
                return doc

    def get_state(self):
        return self._parent.get_state()

    def set_state(self, state):
        self._parent.set_state(state)


class _ParsedDataset(grain.IterDataset):
    def __init__(self, parent: grain.IterDataset, parse: documents.ParseRecords):
        super().__init__(parent)
        self._parse = parse

    def __iter__(self):
        return _ParsedIterator(self._parent.__iter__(), self._parse)


def document_dataset(
    sources: Sequence[Source],
    weights: Mapping[str, float] | None,
    kind: str,
    *,
    seed: int,
    shard_index: int,
    shard_count: int,
    num_epochs: int | None,
    shuffle: bool,
    tracker: BadRecordTracker,
    read_threads: int = 2,
    required: Mapping[str, str] | None = None,
) -> grain.IterDataset:
    """Parsed documents of `sources` (each tagged with its "source"), mixed by `weights`.
    `required`: {field: who reads it}, fields every prompt record must have."""
    by_name = {s.name: s for s in sources}
    if len(by_name) != len(sources):
        raise ValueError(f"Source names must be unique: {[s.name for s in sources]}")
    parse = documents.ParseRecords(by_name, kind, tracker, tuple(required or ()))
    streams = {}
    for source in sources:
        reading = dict(
            shard_index=shard_index,
            shard_count=shard_count,
            seed=_sub_seed(seed, "source", source.name),
            num_epochs=num_epochs,
            shuffle=shuffle,
        )
        if source.format == "seqio":
            from qwen_jax.data import seqio_source  # optional dependency

            ds = seqio_source.SeqioDataset(source, **reading)
        else:
            ds = sources_lib.record_dataset(
                source,
                columns=documents.columns(source, kind),
                check=functools.partial(documents.check_format, source, kind, required=required),
                **reading,
            )
            # Grain's read prefetch costs O(buffer) per element; a short buffer hides local-disk
            # latency without that overhead (raise read_threads for remote file systems).
            ds = ds.to_iter_dataset(
                grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=4 * read_threads)
            )
        streams[source.name] = _ParsedDataset(ds, parse)
    if len(streams) == 1:
        return next(iter(streams.values()))
    weights = weights or {name: 1.0 for name in streams}
    return grain.IterDataset.mix(streams, {name: weights[name] for name in streams})


def _finish(ds: grain.IterDataset, worker_count: int, prefetch: int) -> grain.IterDataset:
    if worker_count:
        if not flags.FLAGS.is_parsed():
            # Grain's worker start-up reads its absl flags; outside `app.run` (tests, notebooks)
            # nothing parsed them, so their defaults are taken.
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=worker_count, per_worker_buffer_size=2)
        )
    if prefetch:
        # Overlaps input work with the training step even without worker processes: tokenization
        # and packing mostly run in Rust/numpy, which release the GIL.
        ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch)
    return ds


def _batched(ds: grain.IterDataset, batch_size: int, finite: bool) -> grain.IterDataset:
    if not finite:
        return ds.batch(batch_size, drop_remainder=True)
    return ds.batch(batch_size).map(functools.partial(packing.pad_batch, batch_size=batch_size))


def pretrain_stage_dataset(
    sources: Mapping[str, Source],
    stage: DataStage,
    tokenizer: Tokenizer,
    *,
    seed: int,
    packing_method: str = "first_fit",
    shard_index: int,
    shard_count: int,
    tracker: BadRecordTracker,
    num_epochs: int | None = None,
    tokenize_batch: int = 128,
    num_packing_bins: int | None = None,
    worker_count: int = 0,
    prefetch: int = 2,
) -> grain.IterDataset:
    """The batches of one stage: its mixture, packed at its sequence length."""
    finite = num_epochs is not None
    per_host = _per_host(stage.batch_size, shard_count, f"DataStage {stage.name!r}")
    docs = document_dataset(
        [sources[name] for name in stage.mixture],
        stage.mixture,
        "text",
        seed=_sub_seed(seed, "stage", stage.name),
        shard_index=shard_index,
        shard_count=shard_count,
        num_epochs=num_epochs,
        shuffle=not finite,
        tracker=tracker,
    )
    ds = docs.batch(tokenize_batch, batch_fn=list)
    split_len = stage.seq_len if packing_method == "first_fit" else None
    ds = grain.experimental.FlatMapIterDataset(
        ds, examples.DocumentsToExamples(tokenizer, split_len)
    )
    ds = packing.pack(
        ds,
        seq_len=stage.seq_len,
        packing=packing_method,
        num_packing_bins=num_packing_bins or per_host,
        seed=_sub_seed(seed, "pack", stage.name),
        pad_id=tokenizer.pad_id,
    )
    return _finish(_batched(ds, per_host, finite), worker_count, prefetch)


def pretrain_iterator(
    sources: Sequence[Source] | Mapping[str, Source],
    stages: Sequence[DataStage],
    tokenizer: Tokenizer,
    *,
    seed: int = 0,
    packing: str = "first_fit",
    shard_index: int | None = None,
    shard_count: int | None = None,
    worker_count: int = 0,
    tokenize_batch: int = 128,
    num_packing_bins: int | None = None,
    prefetch: int = 2,
    min_records_for_bad_check: int = 1000,
) -> StagedIterator:
    """Pre-training batches of the current stage for this host; switches stage after each stage's
    `steps` batches. `iterator.stage` / `iterator.stage_index` name the stage of the next batch."""
    if not isinstance(sources, Mapping):
        sources = {s.name: s for s in sources}
    check_stages(stages, sources)
    shard_index, shard_count = _shard(shard_index, shard_count)
    tracker = BadRecordTracker(
        {s.name: s.max_bad_fraction for s in sources.values()},
        min_records=min_records_for_bad_check,
    )

    def build(stage: DataStage) -> grain.IterDataset:
        return pretrain_stage_dataset(
            sources,
            stage,
            tokenizer,
            seed=seed,
            packing_method=packing,
            shard_index=shard_index,
            shard_count=shard_count,
            tracker=tracker,
            tokenize_batch=tokenize_batch,
            num_packing_bins=num_packing_bins,
            worker_count=worker_count,
            prefetch=prefetch,
        )

    return StagedIterator(stages, build, bad_records=tracker)


def pretrain_eval_iterator(
    source: Source | str,
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    batch_size: int,
    shard_index: int | None = None,
    shard_count: int | None = None,
) -> grain.DatasetIterator:
    """One pass over a held-out text source, packed first-fit; the last batch is padded."""
    (source,) = _as_sources(source, "text")
    shard_index, shard_count = _shard(shard_index, shard_count)
    stage = DataStage("eval", None, seq_len, batch_size, {source.name: 1.0})
    tracker = BadRecordTracker({source.name: source.max_bad_fraction})
    return iter(
        pretrain_stage_dataset(
            {source.name: source},
            stage,
            tokenizer,
            seed=0,
            shard_index=shard_index,
            shard_count=shard_count,
            tracker=tracker,
            num_epochs=1,
            prefetch=0,
        )
    )


def _record_batches(
    srcs,
    weights,
    kind: str,
    caller: str,
    to_rows: Callable[[grain.IterDataset, int], grain.IterDataset],
    *,
    batch_size: int,
    seed: int,
    num_epochs: int | None,
    shard_index: int | None = None,
    shard_count: int | None = None,
    worker_count: int = 0,
    prefetch: int = 2,
    for_eval: bool = False,
    min_records_for_bad_check: int = 1000,
    required: Mapping[str, str] | None = None,
    drop_remainder: bool = False,
) -> grain.DatasetIterator:
    """What the SFT, DPO and GRPO pipelines share: this host's parsed records with bad-record
    accounting, `to_rows(records, per_host_batch)`, then batches. `for_eval`: one unshuffled
    pass, the last batch padded (unless `drop_remainder`: the last batch of each pass is
    dropped when it is short)."""
    if for_eval:
        num_epochs = 1
    shard_index, shard_count = _shard(shard_index, shard_count)
    per_host = _per_host(batch_size, shard_count, caller)
    tracker = BadRecordTracker(
        {s.name: s.max_bad_fraction for s in srcs}, min_records=min_records_for_bad_check
    )
    ds = document_dataset(
        srcs,
        weights,
        kind,
        seed=seed,
        shard_index=shard_index,
        shard_count=shard_count,
        num_epochs=num_epochs,
        shuffle=not for_eval,
        tracker=tracker,
        required=required,
    )
    finite = num_epochs is not None and not drop_remainder
    ds = _batched(to_rows(ds, per_host), per_host, finite=finite)
    return TrackedIterator(iter(_finish(ds, worker_count, 0 if for_eval else prefetch)), tracker)


class TrackedIterator(grain.DatasetIterator):
    """A Grain iterator whose state also carries its bad-record tallies (`bad_records`)."""

    def __init__(self, inner: grain.DatasetIterator, bad_records: BadRecordTracker):
        super().__init__()
        self._inner, self.bad_records = inner, bad_records

    def __next__(self):
        return next(self._inner)

    def get_state(self) -> dict:
        return {"pipeline": self._inner.get_state(), "bad_records": self.bad_records.state()}

    def set_state(self, state: dict) -> None:
        self._inner.set_state(state["pipeline"])
        self.bad_records.restore(state["bad_records"])

    def close(self) -> None:
        self._inner.close()
        super().close()


def sft_iterator(
    sources,
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    batch_size: int,
    seed: int = 0,
    num_epochs: int | None = None,
    weights: Mapping[str, float] | None = None,
    system_prompt: str | None = chat.DEFAULT_SYSTEM_PROMPT,
    num_packing_bins: int | None = None,
    **reading,
) -> grain.DatasetIterator:
    """Packed ChatML batches; loss only on assistant turns. `sources`: Source(s) or glob(s) of
    conversational or prompt-completion records (`qwen_jax.data.documents`). `reading`: the
    keyword arguments of `_record_batches` (shards, workers, prefetch, for_eval, ...)."""

    def pack(records: grain.IterDataset, per_host: int) -> grain.IterDataset:
        return packing.pack(
            records.map(examples.ChatToExample(tokenizer, seq_len, system_prompt)),
            seq_len=seq_len,
            packing="first_fit",
            num_packing_bins=num_packing_bins or per_host,
            seed=_sub_seed(seed, "pack"),
            pad_id=tokenizer.pad_id,
        )

    srcs = _as_sources(sources, "messages")
    return _record_batches(
        srcs,
        weights,
        "messages",
        "sft_iterator",
        pack,
        batch_size=batch_size,
        seed=seed,
        num_epochs=num_epochs,
        **reading,
    )


def dpo_iterator(
    source,
    tokenizer: Tokenizer,
    *,
    prompt_len: int,
    response_len: int,
    batch_size: int,
    seed: int = 0,
    num_epochs: int | None = None,
    system_prompt: str | None = chat.DEFAULT_SYSTEM_PROMPT,
    reference_logps: Mapping[str, tuple[float, float]] | None = None,
    shift: bool = True,
    **reading,
) -> grain.DatasetIterator:
    """Preference pairs, one per row: `chosen_*` and `rejected_*` batches of the same pairs, rows
    of prompt_len + response_len tokens. `source`: Source(s) or glob(s) of preference records,
    explicit or implicit prompt (`qwen_jax.data.documents`). `reference_logps`, `shift`: see
    `examples.PreferenceToExample`; `reading`: as for `sft_iterator`."""
    to_example = examples.PreferenceToExample(
        tokenizer, prompt_len, response_len, system_prompt, reference_logps, shift
    )
    srcs = _as_sources(source, "prompt/chosen/rejected")
    return _record_batches(
        srcs,
        None,
        "preference",
        "dpo_iterator",
        lambda records, _: records.map(to_example),
        batch_size=batch_size,
        seed=seed,
        num_epochs=num_epochs,
        **reading,
    )


def prompt_iterator(
    source,
    tokenizer: Tokenizer,
    *,
    max_prompt_len: int,
    batch_size: int,
    seed: int = 0,
    num_epochs: int | None = None,
    system_prompt: str | None = chat.DEFAULT_SYSTEM_PROMPT,
    required: Mapping[str, str] | None = None,
    **reading,
) -> grain.DatasetIterator:
    """GRPO prompts, `batch_size` per step (whole batches only): `prompt_ids` and
    `prompt_mask` [b, max_prompt_len] left-padded (`examples.PromptToExample`), and `record`,
    the prompt record as JSON for the reward functions. `required`: {field: the reward
    function that reads it}; `reading`: as for `sft_iterator`."""
    to_example = examples.PromptToExample(tokenizer, max_prompt_len, system_prompt)
    return _record_batches(
        _as_sources(source, "prompt"),
        None,
        "prompt",
        "prompt_iterator",
        lambda records, _: records.map(to_example),
        batch_size=batch_size,
        seed=seed,
        num_epochs=num_epochs,
        required=required,
        drop_remainder=True,
        **reading,
    )


def prompt_documents(source) -> Iterator[dict]:
    """Every parsed prompt record of `source` in file order, on this host (held-out prompts)."""
    for src in _as_sources(source, "prompt"):
        yield from _whole_source(src, "prompt")


def preference_documents(source) -> Iterator[dict]:
    """Every parsed preference pair of `source` (Source(s) or glob(s)) in file order, with its
    "loc": one pass on this host over all records, for computing per-pair values up front."""
    for src in _as_sources(source, "prompt/chosen/rejected"):
        yield from _whole_source(src, "preference")


def _whole_source(src: Source, kind: str) -> grain.IterDataset:
    """Every parsed record of `src` once, in file order, on this host."""
    return document_dataset(
        [src],
        None,
        kind,
        seed=0,
        shard_index=0,
        shard_count=1,
        num_epochs=1,
        shuffle=False,
        tracker=BadRecordTracker({src.name: src.max_bad_fraction}),
    )


def generation_eval_examples(
    source: Source | str,
    tokenizer: Tokenizer,
    *,
    system_prompt: str | None = chat.DEFAULT_SYSTEM_PROMPT,
    limit: int | None = None,
) -> Iterator[dict]:
    """For exact-match eval: each held-out conversation cut before its last assistant turn.

    Yields {"prompt_ids": int32 array ending in `<|im_start|>assistant\\n`, "answer": str, "loc"}.
    Reads the whole source on every host (eval sets are small).
    """
    (src,) = _as_sources(source, "messages")
    for n, doc in enumerate(_whole_source(src, "messages")):
        if limit is not None and n >= limit:
            return
        messages = doc["messages"]
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if not turns:
            logging.warning("%s has no assistant turn to evaluate; skipped", doc["loc"])
            continue
        last = turns[-1]
        ids, _ = chat.render_chat(
            messages[:last], tokenizer, add_generation_prompt=True, system_prompt=system_prompt
        )
        yield {"prompt_ids": ids, "answer": messages[last]["content"], "loc": doc["loc"]}
