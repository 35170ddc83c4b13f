"""Eval examples whose prompt or reply also occurs in training (exact, whitespace normalised).

An example's prompt is the text of its non-assistant turns (a completion's prompt), its reply
the text of its assistant turns (a completion's completion), each with runs of whitespace made
one space. Training texts are kept as 16-byte digests, so the index costs ~100 bytes per
training example.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
from typing import Any

from sft_jax.data import formats, records
from sft_jax.data.messages import BadExample

log = logging.getLogger(__name__)
_SHOWN = 5  # contaminated examples named in the log


def texts(value: Any, data_format: str) -> tuple[str, str]:
    """(prompt, reply) of one raw example, whitespace normalised; ("", "") when malformed."""
    try:
        example = formats.normalize(value, data_format)
    except BadExample:
        return "", ""
    if isinstance(example, formats.Completion):
        prompt, reply = example.prompt, example.completion
    else:
        parts: dict[bool, list[str]] = {True: [], False: []}
        for message in example.messages:
            parts[message["role"] == "assistant"].append(str(message.get("content") or ""))
        prompt, reply = "\n".join(parts[False]), "\n".join(parts[True])
    return " ".join(prompt.split()), " ".join(reply.split())


def _digest(kind: str, text: str) -> bytes:
    return hashlib.blake2b(f"{kind}\0{text}".encode(), digest_size=16).digest()


class _Ignore:
    def bad(self, where: str, problem: str, reason: str) -> None:
        del where, problem, reason  # tokenization reports malformed lines


def _examples(spec: str, split: str, data_format: str, field: str, limit: int = 0):
    sources = records.expand_sources(spec, field)
    if data_format == "auto":
        first = next(iter(records.read_records(sources[0], split, _Ignore())), None)
        data_format = formats.detect_format(first.value) if first else None
    stream = (r for source in sources for r in records.read_records(source, split, _Ignore()))
    if limit:
        stream = itertools.islice(stream, limit)
    for record in stream:
        yield record, texts(record.value, data_format) if data_format else ("", "")


def train_index(train: list[tuple[str, str, str, int]]) -> set[bytes]:
    """Digests of every non-empty training prompt and reply; train holds
    (files, split, format, max_examples) per source."""
    seen = set()
    for spec, split, data_format, limit in train:
        for _, (prompt, reply) in _examples(spec, split, data_format, "train_files", limit):
            seen.update(_digest(k, t) for k, t in (("p", prompt), ("r", reply)) if t)
    return seen


def report(spec: str, split: str, data_format: str, seen: set[bytes], field: str) -> set[str]:
    """Where each contaminated eval example was read (e.g. "eval.jsonl:12"); logs the count."""
    found, total = [], 0
    for record, (prompt, reply) in _examples(spec, split, data_format, field):
        total += 1
        hits = [
            k for k, t in (("prompt", prompt), ("reply", reply)) if t and _digest(k[0], t) in seen
        ]
        if hits:
            found.append(f"{record.where} ({' and '.join(hits)})")
    if found:
        log.warning(
            "%s: %d of %d eval examples also occur in training (first: %s)",
            field,
            len(found),
            total,
            ", ".join(found[:_SHOWN]),
        )
    else:
        log.info("%s: none of %d eval examples occurs in training", field, total)
    return {entry.rsplit(" (", 1)[0] for entry in found}
