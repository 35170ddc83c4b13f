"""Eval examples whose prompt or reply also occurs in training (exact, whitespace normalised).

An example's prompt is the text of its non-assistant turns (a completion's prompt), its reply
the text of its assistant turns (a completion's completion), each with runs of whitespace made
one space. The eval texts are kept as 16-byte digests and the training examples streamed past
them, so memory grows with the eval set (~200 bytes an example), never with the training data.
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


def report(
    spec: str,
    split: str,
    data_format: str,
    train: list[tuple[str, str, str, int]],
    field: str,
) -> set[str]:
    """Where each contaminated eval example was read (e.g. "eval.jsonl:12"); logs the count.
    train holds (files, split, format, max_examples) per source."""
    wheres, wanted = [], {}  # digest of an eval prompt or reply -> [(example, "prompt")...]
    for record, (prompt, reply) in _examples(spec, split, data_format, field):
        for kind, text in (("prompt", prompt), ("reply", reply)):
            if text:
                wanted.setdefault(_digest(kind[0], text), []).append((len(wheres), kind))
        wheres.append(record.where)
    hits: dict[int, set[str]] = {}
    for files, train_split, train_format, limit in train:
        for _, texts_ in _examples(files, train_split, train_format, "train_files", limit):
            for kind, text in zip("pr", texts_, strict=True):
                for example, name in wanted.get(_digest(kind, text), []) if text else []:
                    hits.setdefault(example, set()).add(name)
    found = [
        f"{wheres[i]} ({' and '.join(k for k in ('prompt', 'reply') if k in hits[i])})"
        for i in sorted(hits)
    ]
    if found:
        log.warning(
            "%s: %d of %d eval examples also occur in training (first: %s)",
            field,
            len(found),
            len(wheres),
            ", ".join(found[:_SHOWN]),
        )
    else:
        log.info("%s: none of %d eval examples occurs in training", field, len(wheres))
    return {entry.rsplit(" (", 1)[0] for entry in found}
