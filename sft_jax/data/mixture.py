"""config.data (one source or a weighted mixture) -> tokenized stores -> the streamed DataSource.

A mixture source is a dict in config.data.mixture:

  {"name": "math", "train_files": "gs://bucket/math/*.jsonl", "weight": 0.3,
   "eval_files": "...", "format": "messages", "template_kwargs": "{...}", "max_examples": 0}

Only name, train_files and weight are required; the rest default to config.data's fields.
Without a mixture, config.data.train_files / eval_files are the one source, named "train".
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sft_jax.core.spec import DataSpec, RunSpec
from sft_jax.data import (
    batches,
    contamination,
    pipeline,
    records,
    stats,
    store,
    stream,
    tokenize,
)
from sft_jax.data.records import DataError, Record

log = logging.getLogger(__name__)
SOURCE_FIELDS = (
    "name",
    "train_files",
    "weight",
    "eval_files",
    "train_split",
    "eval_split",
    "format",
    "template_kwargs",
    "max_examples",
)
CONTAMINATION = ("off", "report", "drop")  # config.data.contamination


@dataclasses.dataclass(frozen=True)
class Source:
    """One mixture source, its options resolved against config.data."""

    name: str
    train_files: str
    weight: float
    eval_files: str
    data: DataSpec  # config.data with this source's overrides
    max_examples: int  # training examples read (0: all)


def sources_of(data: DataSpec) -> list[Source]:
    """config.data.mixture, or config.data's own files as the one source "train"."""
    mixture = list(data.mixture)
    if not mixture:
        mixture = [
            {
                "name": "train",
                "train_files": data.train_files,
                "weight": 1.0,
                "eval_files": data.eval_files,
            }
        ]
    out = []
    for number, entry in enumerate(mixture):
        entry = dict(entry)
        overrides = {
            k: entry[k]
            for k in ("format", "template_kwargs", "train_split", "eval_split")
            if k in entry
        }
        source_data = data.replace(**overrides)
        out.append(
            Source(
                name=str(entry.get("name", f"source{number}")),
                train_files=entry["train_files"],
                weight=float(entry.get("weight", 1.0)),
                eval_files=entry.get("eval_files", ""),
                data=source_data,
                max_examples=int(entry.get("max_examples", 0)),
            )
        )
    return out


def prepared(
    spec: str,
    split: str,
    field: str,
    tokenizer: Any,
    data: DataSpec,
    limit: int = 0,
    keep: Callable[[Record], bool] | None = None,
    key_extra: str = "",
) -> tuple[tokenize.Tokenized, str]:
    """The store of these sources (the first `limit` examples, those `keep` accepts), written
    now when no earlier run or `python -m sft_jax.data.prepare` wrote it."""
    sources = records.expand_sources(spec, field)
    options = pipeline.tokenize_options(data, sources, split)
    key = tokenize.cache_key(records.fingerprint(sources, split), tokenizer, options)
    if limit or key_extra:
        key = hashlib.sha256(f"{key}/limit={limit}/{key_extra}".encode()).hexdigest()[:32]
    root = store_root(data)
    found = store.open_store(root, key)
    if found is None:
        log.info("%s: tokenizing into the store %s", field, root / key)
        bad = pipeline.BadRecords(data.skip_bad_examples)
        stream_ = (r for source in sources for r in records.read_records(source, split, bad))
        if limit:
            stream_ = itertools.islice(stream_, limit)
        if keep is not None:
            stream_ = filter(keep, stream_)
        workers = data.num_workers or pipeline.auto_workers(sources)
        _write(store.StoreWriter(root, key), tokenizer, stream_, options, bad, workers, field)
        found = store.open_store(root, key)
    pipeline.warn_about_counts(field, found.stats)
    return found, key


def _write(
    writer: store.StoreWriter,
    tokenizer: Any,
    stream_: Any,
    options: tokenize.Options,
    bad: pipeline.BadRecords,
    workers: int,
    field: str,
) -> None:
    """Tokenizes chunk after chunk (in parallel) and appends each to the store as it comes:
    memory holds the chunks in flight, whatever the data's size."""
    totals = tokenize.empty_stats()
    try:
        for part in tokenize.tokenized_chunks(tokenizer, stream_, options, workers):
            writer.append(part)
            stats.add(totals, part.stats)
        for _, reason in bad.skipped:
            totals["examples_read"] += 1
            totals["dropped"][reason] = totals["dropped"].get(reason, 0) + 1
        if totals["trainable_tokens"] == 0:
            raise DataError(
                f"{field}: no trainable tokens in {totals['examples_read']} examples (dropped: "
                f"{totals['dropped']}). Check config.data.train_on, max_length and the data."
            )
    except BaseException:
        writer.abort()
        raise
    writer.close(totals)


def store_root(data: DataSpec) -> Path:
    base = data.cache_dir if data.cache_dir not in ("", "none") else pipeline.default_cache_dir()
    return Path(base).expanduser() / "stores"


@dataclasses.dataclass
class Prepared:
    """Every source's train store and eval set, the tokenizer, and a fingerprint of them."""

    sources: list[Source]
    train: list[tokenize.Tokenized]
    evals: dict[str, tokenize.Tokenized]  # per source name, for the sources with eval files
    tokenizer: Any
    fingerprint: str


def prepare_all(config: RunSpec) -> Prepared:
    """The stores of every source (what `python -m sft_jax.data.prepare` writes)."""
    tokenizer, sources = pipeline.run_tokenizer(config), sources_of(config.data)
    train, evals, keys = [], {}, []
    for source in sources:
        field = f"config.data.mixture[{source.name}].train_files"
        tokenized, key = prepared(
            source.train_files,
            source.data.train_split,
            field,
            tokenizer,
            source.data,
            limit=source.max_examples,
        )
        train.append(tokenized)
        keys.append(f"{key}*{source.weight}")
    for source in sources:
        if source.eval_files:
            evals[source.name], key = _eval_set(config, source, sources, tokenizer)
            keys.append(key)
    keys.append(f"window={config.data.stream_window}")
    return Prepared(sources, train, evals, tokenizer, "/".join(keys))


def _eval_set(
    config: RunSpec, source: Source, sources: list[Source], tokenizer: Any
) -> tuple[tokenize.Tokenized, str]:
    """A source's eval store, checked against every source's training examples."""
    field = f"config.data.mixture[{source.name}].eval_files"
    mode, keep, extra = config.data.contamination, None, ""
    if mode != "off":
        train = [
            (s.train_files, s.data.train_split, s.data.format, s.max_examples) for s in sources
        ]
        found = contamination.report(
            source.eval_files, source.data.eval_split, source.data.format, train, field
        )
        if mode == "drop" and found:
            keep, extra = (lambda record: record.where not in found), f"drop={sorted(found)}"
    tokenized, key = prepared(
        source.eval_files,
        source.data.eval_split,
        field,
        tokenizer,
        source.data,
        keep=keep,
        key_extra=extra,
    )
    limit = config.data.eval_max_examples
    if 0 < limit < len(tokenized):
        tokenized = tokenized.subset(range(limit))
    return tokenized, key


def open_stream_data(config: RunSpec, feed: tuple[int, int] | None = None) -> pipeline.DataSource:
    """The trainer's DataSource for this process, streamed from the stores; `feed`:
    pipeline.row_share."""
    ready, data = prepare_all(config), config.data
    process = pipeline.row_share(feed)
    documents = stream.Documents(ready.train)
    train = stream.StreamBatches(
        documents,
        [s.weight for s in ready.sources],
        **stream.window_options(data, config.train.seed, config.train.global_batch_size, process),
        fingerprint=ready.fingerprint,
    )
    for source, tokenized in zip(ready.sources, ready.train, strict=True):
        log.info(
            "train %s (weight %g): %s",
            source.name,
            source.weight,
            pipeline.summary_line(tokenized.stats),
        )
    bound = train.documents_per_row()
    eval_sets = {
        name: _eval_batches(config, tokenized, process, bound)
        for name, tokenized in ready.evals.items()
    }
    first_eval = next(iter(ready.evals.values()), None)
    return pipeline.DataSource(
        train_batches=train,
        **pipeline.named_evals(eval_sets),
        seq_len=data.max_length,
        max_segments=train.documents_per_row() + 1,
        tokenizer=ready.tokenizer,
        eval_prompts=pipeline.eval_prompts(
            first_eval, max(config.eval.generate_examples, config.eval.show_samples)
        ),
    )


def _eval_batches(
    config: RunSpec,
    tokenized: tokenize.Tokenized,
    process: tuple[int, int],
    bound: int,
) -> list[dict]:
    """Eval rows hold at most as many documents as training rows (the kernel's bound)."""
    data = config.data
    return batches.eval_batches(
        tokenized,
        global_rows=config.eval.global_batch_size,
        row_len=data.max_length,
        packing=data.packing,
        process_index=process[0],
        process_count=process[1],
        max_docs=bound,
    )
