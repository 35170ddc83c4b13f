"""config.data -> tokenized train and eval sets -> the DataSource the trainer consumes."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np

from sft_jax.adapters.prompts import PromptSpec, virtual_token_ids
from sft_jax.core.spec import DataSpec, RunSpec
from sft_jax.data import (
    batches,
    certificate,
    cloud,
    formats,
    images,
    records,
    templates,
    tokenize,
    vision,
    vision_check,
)
from sft_jax.data.records import DataError
from sft_jax.models.io.hf import resolve_model_dir

log = logging.getLogger(__name__)
_PARALLEL_ABOVE_BYTES = 64 * 1024**2
_CERTIFY_SAMPLE = 64  # training examples checked at start-up


def run_tokenizer(config: RunSpec) -> Any:
    """The run's tokenizer: config.data.tokenizer, else the model's, with config.data's
    chat template (also what export writes beside the weights)."""
    data = config.data
    source = data.tokenizer or str(resolve_model_dir(config.model.name_or_path))
    return templates.load_tokenizer(source, data.chat_template)


def _resolve_format(data_format: str, sources: list[str], split: str) -> str:
    """The configured format, or the one the first example of the first source has."""
    if data_format != "auto":
        return data_format

    class _Stop:
        def bad(self, where: str, problem: str, reason: str) -> None:
            raise DataError(f"{where}: {problem}.")

    first = next(iter(records.read_records(sources[0], split, _Stop())), None)
    if first is None:
        raise DataError(f"{sources[0]}: holds no examples.")
    detected = formats.detect_format(first.value)
    if detected is None:
        columns = sorted(first.value) if isinstance(first.value, dict) else type(first.value)
        raise DataError(
            f"{first.where}: cannot tell the data format from the fields {columns}. Expected "
            f"the fields of one of: {formats.describe_formats()}; or set config.data.format."
        )
    return detected


class BadRecords:
    """Malformed lines while reading: an error, or a counted skip (reason 'invalid_json')."""

    def __init__(self, skip: bool):
        self.skip = skip
        self.skipped: list[tuple[str, str]] = []

    def bad(self, where: str, problem: str, reason: str) -> None:
        if not self.skip:
            raise DataError(
                f"{where}: {problem}. Fix the line, or set config.data.skip_bad_examples=True "
                "to count and skip such lines."
            )
        self.skipped.append((where, reason))


def tokenize_sources(
    spec: str,
    split: str,
    field: str,
    tokenizer: Any,
    data: DataSpec,
    reserved: int = 0,
) -> tuple[tokenize.Tokenized, str]:
    """Tokenized documents of comma-separated sources (from the cache when possible)."""
    sources = records.expand_sources(spec, field)
    options = tokenize_options(data, sources, split, reserved)
    key = tokenize.cache_key(records.fingerprint(sources, split), tokenizer, options)
    cache_dir = Path(data.cache_dir or default_cache_dir()).expanduser()
    cached = tokenize.load_cached(cache_dir, key) if data.cache_dir != "none" else None
    if cached is not None:
        log.info("%s: %d documents from the tokenization cache", field, len(cached))
        warn_about_counts(field, cached.stats)
        return cached, key
    bad = BadRecords(data.skip_bad_examples)
    stream = (r for source in sources for r in records.read_records(source, split, bad))
    workers = data.num_workers or auto_workers(sources)
    tokenized = tokenize.tokenize_records(tokenizer, stream, options, workers)
    for _, reason in bad.skipped:
        tokenized.stats["examples_read"] += 1
        tokenized.stats["dropped"][reason] = tokenized.stats["dropped"].get(reason, 0) + 1
    warn_about_counts(field, tokenized.stats)
    if tokenized.stats["trainable_tokens"] == 0:
        raise DataError(
            f"{field}={spec!r}: no trainable tokens in {tokenized.stats['examples_read']} examples"
            f" (dropped: {tokenized.stats['dropped']}). Check config.data.train_on, "
            "config.data.max_length and the data."
        )
    if data.cache_dir != "none":
        tokenize.save_cached(cache_dir, key, tokenized)
    return tokenized, key


def warn_about_counts(field: str, stats: dict[str, Any]) -> None:
    """One warning per kind of kept example worth a look: empty replies, and turns trained as
    the template renders them without their text content (each with the first file:line)."""
    warn_about_empty_replies(field, stats)
    warn_about_dropped_content(field, stats)


def warn_about_dropped_content(field: str, stats: dict[str, Any]) -> None:
    """The count and first place of trained turns whose text content the template leaves out."""
    if stats.get("template_dropped_content"):
        log.warning(
            "%s: %d assistant turns have text content the chat template does not render (the "
            "first at %s; template_dropped_content): each trains as rendered, its tool calls "
            "without the text, which is what the model reads and writes at inference. Use a "
            "config.data.chat_template that renders the text to train it.",
            field,
            stats["template_dropped_content"],
            stats["first_template_dropped_content"],
        )


def warn_about_empty_replies(field: str, stats: dict[str, Any]) -> None:
    """The count and first place of kept examples with an empty assistant reply."""
    if stats.get("empty_replies"):
        log.warning(
            "%s: %d examples have an empty assistant reply (the first at %s); each trains "
            "only its end-of-turn token. Fix them, or set config.data.empty_replies='skip' to "
            "drop them or 'error' to stop at the first.",
            field,
            stats["empty_replies"],
            stats["first_empty_reply"],
        )


def tokenize_options(
    data: DataSpec, sources: list[str], split: str, reserved: int = 0
) -> tokenize.Options:
    """reserved: slots of each row's document taken by virtual tokens (prompt / P-tuning), so
    documents are cut, and counted as truncated, at max_length - reserved."""
    return tokenize.Options(
        data_format=_resolve_format(data.format, sources, split),
        train_on=data.train_on,
        max_length=data.max_length - reserved,
        skip_bad=data.skip_bad_examples,
        empty_replies=data.empty_replies,
        overlong=data.overlong,
        train_reasoning=data.train_reasoning,
        template_kwargs=data.template_kwargs,
    )


class _IgnoreBadRecords:
    """Unreadable lines while certifying: tokenization reports them."""

    def bad(self, where: str, problem: str, reason: str) -> None:
        del where, problem, reason


def certify(config: RunSpec, tokenizer: Any, sample: int = 0) -> dict:
    """The mask certificate (sft_jax.data.certificate) of the first `sample` training
    examples (0: all of them). Data with images is checked as the model's processor
    prepares it (data/vision_check.py), each source's image paths from its folder."""
    data = config.data
    sources = records.expand_sources(data.train_files, "config.data.train_files")
    options = tokenize_options(
        data, sources, data.train_split, PromptSpec.from_config(config).tokens_in_rows
    )
    processor = _vision_processor(config, sources)
    reports = []
    for source in sources:
        stream = records.read_records(source, data.train_split, _IgnoreBadRecords())
        if sample:
            stream = itertools.islice(stream, sample - sum(r["examples"] for r in reports))
        if processor is None:
            reports.append(certificate.check_records(tokenizer, stream, options))
            continue
        check = vision_check.image_checker(processor, options, Path(source).parent)
        reports.append(certificate.check_records(processor.tokenizer, stream, options, check))
    return certificate.merged(reports)


def _vision_processor(config: RunSpec, sources: list[str]) -> Any:
    """The model's processor when one of the first examples holds an image, else None."""
    stream = records.read_records(sources[0], config.data.train_split, _IgnoreBadRecords())
    if not images.any_has_images(record.value for record in stream):
        return None
    source = config.data.tokenizer or str(resolve_model_dir(config.model.name_or_path))
    return vision.load_processor(source, config.data.chat_template)


def check_at_start(config: RunSpec, tokenizer: Any) -> None:
    """Training's start-up check: the certificate of a sample, logged; violations stop it."""
    report = certify(config, tokenizer, _CERTIFY_SAMPLE)
    log.info(
        "what trains (mask certificate of %d examples):\n%s",
        report["examples"],
        certificate.table(report),
    )
    if report["violations"]:
        first = report["violations"][0]
        raise DataError(
            f"{first['where']}: the mask check failed at characters {first['span']}: "
            f"{first['problem']} ({len(report['violations'])} violations in "
            f"{report['examples']} examples; python -m sft_jax.data.inspect --check lists them)."
        )


def auto_workers(sources: list[str]) -> int:
    """One process for small local data (starting workers costs seconds), else one per core."""
    cores = min(os.cpu_count() or 1, 8)
    if any(source.startswith(records.HUB_PREFIX) or cloud.is_remote(source) for source in sources):
        return cores
    small = sum(os.path.getsize(source) for source in sources) < _PARALLEL_ABOVE_BYTES
    return 1 if small else cores


def default_cache_dir() -> str:
    return os.environ.get("SFT_JAX_CACHE", "~/.cache/sft_jax/tokenized")


def split_eval(
    tokenized: tokenize.Tokenized, fraction: float, seed: int
) -> tuple[tokenize.Tokenized, tokenize.Tokenized]:
    """A deterministic hold-out: the documents a seeded permutation puts first go to eval."""
    train_ids, eval_ids = held_out(len(tokenized), fraction, seed)
    return tokenized.subset(train_ids), tokenized.subset(eval_ids)


def held_out(count: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train ids, eval ids) of split_eval's hold-out of `count` documents, each sorted."""
    order = np.random.default_rng([seed, 1]).permutation(count)
    held = max(1, round(fraction * count))
    if held >= count:
        raise DataError(
            f"config.data.eval_fraction={fraction} leaves no training data ({count} documents)."
        )
    return np.sort(order[held:]), np.sort(order[:held])


@dataclasses.dataclass
class DataSource:
    """What the training loop needs from the data layer."""

    # Endless iterator of this process's rows, with get_state() / set_state(state) (JSON).
    train_batches: Iterator[dict[str, np.ndarray]]
    eval_batches: Callable[[], Iterable[dict[str, np.ndarray]]]  # one pass over the eval set
    seq_len: int
    # Most segments in any row of train or eval batches (documents, and padding as one more);
    # 0: unknown, config.data.max_documents_per_row + 1 is assumed.
    max_segments: int = 0
    tokenizer: Any = None
    # (prompt tokens, reference reply tokens) of eval examples, for generation during eval.
    eval_prompts: list[tuple[np.ndarray, np.ndarray]] = dataclasses.field(default_factory=list)
    # Image-text data: per eval prompt, (the processor's arrays of its images, their names).
    eval_images: list[tuple[dict[str, np.ndarray], tuple[str, ...]]] = dataclasses.field(
        default_factory=list
    )
    # Per mixture source with eval files: one pass over its eval set (eval/<name>/loss).
    eval_sets: dict[str, Callable[[], Iterable[dict[str, np.ndarray]]]] = dataclasses.field(
        default_factory=dict
    )
    # Preference pairs: precompute_reference(score, global_rows) runs `score` (this process's
    # rows of a batch of global_rows -> [global_rows, T] reference log-probs of every row) once
    # over the train and eval pairs; from then on their batches hold REFERENCE_KEY. None:
    # this data cannot carry it.
    precompute_reference: Callable[[Callable, int], None] | None = None
    # Online RL: the prompts the policy's completions are sampled from (sft_jax.data.prompts).
    prompts: Any = None
    # An image-text model's image fields in the batches with their per-row shapes (the IMAGE
    # kind's; () for TOKEN fields): models/image_rows.py.
    images: tuple[tuple[str, tuple[int, ...]], ...] = ()


@dataclasses.dataclass
class Datasets:
    """Tokenized train and eval documents, the tokenizer, and the fingerprint of the train
    documents (content_fingerprint: what a checkpoint's data position means)."""

    train: tokenize.Tokenized
    eval: tokenize.Tokenized | None
    tokenizer: Any
    fingerprint: str


def load_datasets(config: RunSpec) -> Datasets:
    data = config.data
    tokenizer = run_tokenizer(config)
    reserved = PromptSpec.from_config(config).tokens_in_rows
    train, _ = tokenize_sources(
        data.train_files, data.train_split, "config.data.train_files", tokenizer, data, reserved
    )
    if data.train_on != "all_tokens":
        check_at_start(config, tokenizer)
    evaluation = None
    if data.eval_files:
        evaluation, _ = tokenize_sources(
            data.eval_files, data.eval_split, "config.data.eval_files", tokenizer, data, reserved
        )
        if 0 < data.eval_max_examples < len(evaluation):
            evaluation = evaluation.subset(range(data.eval_max_examples))
    elif data.eval_fraction > 0:
        train, evaluation = split_eval(train, data.eval_fraction, config.train.seed)
    return Datasets(train, evaluation, tokenizer, content_fingerprint(train))


def content_fingerprint(tokenized: tokenize.Tokenized) -> str:
    """What a checkpoint's data position means: the training documents themselves (tokens,
    trained flags, boundaries). It changes exactly when the rows would, so a resume is refused
    for other data, another tokenizer or other options, and not for a code change that left
    every document as it was (the tokenization cache's key, which does change, is not it)."""
    digest = hashlib.blake2b(digest_size=16)
    for array in (tokenized.tokens, tokenized.trained, tokenized.offsets):
        # In slices: a store's tokens are never all in memory at once (the same digest).
        for start in range(0, len(array), _HASHED_AT_ONCE):
            digest.update(np.ascontiguousarray(array[start : start + _HASHED_AT_ONCE]).tobytes())
    return batches.DOCUMENTS_FINGERPRINT + digest.hexdigest()


_HASHED_AT_ONCE = 2**24  # values of an array hashed at a time by content_fingerprint


def with_virtual_tokens(loaded: Datasets, spec: PromptSpec) -> Datasets:
    """Every document with prompt / P-tuning's N virtual tokens first (input ids -1..-N,
    untrained; its positions then start at N, as the Hugging Face model numbers them)."""
    if not spec.tokens_in_rows:
        return loaded
    ids = virtual_token_ids(spec.tokens_in_rows)
    evaluation = loaded.eval.with_prefix(ids) if loaded.eval is not None else None
    return dataclasses.replace(loaded, train=loaded.train.with_prefix(ids), eval=evaluation)


def row_share(feed: tuple[int, int] | None) -> tuple[int, int]:
    """(block, blocks) of each global batch's rows this process feeds: `feed` as the trainer
    gives it (sharding.row_feed: processes of one data-parallel group feed the same block),
    else each process its own block."""
    return feed if feed is not None else (jax.process_index(), jax.process_count())


def row_options(config: RunSpec, feed: tuple[int, int] | None) -> dict:
    """The arguments every train-row iterator takes from the config and the process's feed."""
    data, process = config.data, row_share(feed)
    return {
        "global_rows": config.train.global_batch_size,
        "row_len": data.max_length,
        "packing": data.packing,
        "seed": config.train.seed,
        "shuffle": data.shuffle,
        "process_index": process[0],
        "process_count": process[1],
    }


def open_data(config: RunSpec, feed: tuple[int, int] | None = None) -> DataSource:
    """The trainer's DataSource for this process, built from config.data; `feed`: row_share."""
    loaded = with_virtual_tokens(load_datasets(config), PromptSpec.from_config(config))
    data, process = config.data, row_share(feed)
    train = batches.TrainBatches(
        loaded.train,
        **row_options(config, feed),
        fingerprint=loaded.fingerprint,
        max_docs=data.max_documents_per_row,
    )
    log.info("train: %s", summary_line(loaded.train.stats))
    documents, evaluation = train.documents_per_row(), []
    if loaded.eval is not None:
        rows = batches.eval_rows(
            loaded.eval,
            row_len=data.max_length,
            packing=data.packing,
            max_docs=data.max_documents_per_row,
        )
        documents = max([documents, *(len(row) for row in rows)])
        evaluation = batches.batches_of_rows(
            loaded.eval, rows, config.eval.global_batch_size, data.max_length, *process
        )
    return DataSource(
        train_batches=train,
        eval_batches=lambda: evaluation,
        seq_len=data.max_length,
        max_segments=documents + 1,  # padding after the documents is one more segment
        tokenizer=loaded.tokenizer,
        eval_prompts=eval_prompts(
            loaded.eval, max(config.eval.generate_examples, config.eval.show_samples)
        ),
    )


def eval_prompts(
    tokenized: tokenize.Tokenized | None, count: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(prompt, reference reply) of the first `count` eval documents that have a prompt."""
    pairs = []
    for index in range(len(tokenized) if tokenized is not None else 0):
        if len(pairs) == count:
            break
        pair = tokenized.last_reply(index)
        if pair is not None:
            pairs.append(pair)
    return pairs


def summary_line(stats: dict[str, Any]) -> str:
    expanded = stats.get("expanded_examples", 0)
    dropped_content = stats.get("template_dropped_content", 0)
    return (
        f"{stats['examples_kept']} of {stats['examples_read']} examples kept "
        f"(dropped {stats['dropped'] or 'none'}, truncated {stats['truncated']}), "
        f"{stats['trainable_tokens']} trainable of {stats['tokens']} tokens"
        + (
            f"; {expanded} conversations rendered as {stats['expanded_documents']} documents "
            "(the chat template renders earlier turns differently later: each such turn is "
            "trained as rendered at inference)"
            if expanded
            else ""
        )
        + (
            f"; {dropped_content} assistant turns trained as the chat template renders them, "
            "without their text content (template_dropped_content)"
            if dropped_content
            else ""
        )
    )


def named_evals(eval_sets: dict[str, list[dict[str, np.ndarray]]]) -> dict[str, Any]:
    """DataSource's eval_batches (every set's, in order) and eval_sets (by name, if several)."""
    everything = [batch for batches in eval_sets.values() for batch in batches]
    named = {name: (lambda b=b: b) for name, b in eval_sets.items()} if len(eval_sets) > 1 else {}
    return {"eval_batches": lambda: everything, "eval_sets": named}
