"""Examples with images, prepared once into the tokenized store: tokens, trained flags and the
processor's per-image arrays, so that a restart reads the store and opens no image file.

The store's key (tokenize.cache_key) covers the data file, every local image file it names
(path, size and modification time, by stat), the processor's image settings, the tokenizer and
chat template, the options and the code that renders, masks and preprocesses.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import itertools
from pathlib import Path
from typing import Any

import numpy as np

from sft_jax.data import images as image_files
from sft_jax.data.messages import BadExample
from sft_jax.data.records import DataError, Record, fingerprint, read_records
from sft_jax.data.stats import add as add_stats
from sft_jax.data.store import StoredImages, StoreWriter, open_images, open_store
from sft_jax.data.tokenize import Options, Tokenized, cache_key, empty_stats, from_documents
from sft_jax.data.vision import VisionDocument, tokenize_vision_records, vision_example

_CODE = ("images.py", "vision.py", "vision_data.py")
IMAGE_TOKENS = "image_tokens"  # stored beside the processor's arrays: tokens of each image
IMAGE_LABELS = "image_labels"  # and each image's name (VisionDocument.labels), UTF-8 bytes
_LABEL_BYTES = 256


def _encoded(labels: tuple[str, ...]) -> np.ndarray:
    """[images, 256] uint8: each label's UTF-8 bytes, cut at 256, zero-padded."""
    rows = [label.encode()[:_LABEL_BYTES].ljust(_LABEL_BYTES, b"\0") for label in labels]
    return np.frombuffer(b"".join(rows), np.uint8).reshape(len(labels), _LABEL_BYTES)


def _decoded(array: np.ndarray) -> tuple[str, ...]:
    return tuple(bytes(row).rstrip(b"\0").decode(errors="ignore") for row in array)


@dataclasses.dataclass(frozen=True)
class EvalPrompt:
    """An eval example's prompt (up to its last reply), the reference reply, and the prompt's
    images: the processor's arrays and each image's name."""

    prompt: np.ndarray
    reference: np.ndarray
    images: dict[str, np.ndarray]
    labels: tuple[str, ...]


@dataclasses.dataclass
class VisionData:
    """A prepared source: document i is tokenized.document(i) with images.document(i)."""

    tokenized: Tokenized
    images: StoredImages | None  # None when no example has an image

    def __len__(self) -> int:
        return len(self.tokenized)

    def image_lengths(self) -> dict[str, np.ndarray]:
        """Each processor array's length on axis 0 in every document, by name (none: text)."""
        lengths = self.images.lengths() if self.images is not None else {}
        return {name: n for name, n in lengths.items() if name != IMAGE_LABELS}

    def document(self, index: int) -> VisionDocument:
        tokens, trained = self.tokenized.document(index)
        arrays = self.images.document(index) if self.images is not None else {}
        counts = arrays.pop(IMAGE_TOKENS, np.zeros(0, np.int32))
        labels = _decoded(arrays.pop(IMAGE_LABELS, np.zeros((0, _LABEL_BYTES), np.uint8)))
        return VisionDocument(np.asarray(tokens), np.asarray(trained, bool), counts, arrays, labels)

    def eval_prompts(self, count: int, image_token_ids: list[int]) -> list[EvalPrompt]:
        """The first `count` documents' EvalPrompts that hold every image of their document
        (the images lie before the reply, as they are only in user and system messages)."""
        prompts = []
        for index in range(len(self)):
            pair = self.tokenized.last_reply(index)
            if len(prompts) == count:
                break
            if pair is None:
                continue
            document = self.document(index)
            seen = int(np.isin(pair[0], image_token_ids).sum())
            if seen == int(document.image_tokens.sum()):
                prompts.append(EvalPrompt(*pair, document.images, document.labels))
        return prompts

    def subset(self, indices: np.ndarray) -> VisionData:
        """Documents `indices` (in that order) with their images: tokens copied, the image
        arrays still read from the store."""
        images = None if self.images is None else _ImagesOf(self.images, indices)
        return VisionData(self.tokenized.subset(indices), images)


class _ImagesOf:
    """StoredImages of some of a store's documents (document i: the store's indices[i])."""

    def __init__(self, images: Any, indices: np.ndarray):
        self.images, self.indices = images, np.asarray(indices, np.int64)

    def lengths(self) -> dict[str, np.ndarray]:
        return {name: lengths[self.indices] for name, lengths in self.images.lengths().items()}

    def document(self, index: int) -> dict[str, np.ndarray]:
        return self.images.document(int(self.indices[index]))


class _BadLines:
    """An unparseable line stops with its file and line, or is counted (skip_bad_examples)."""

    def __init__(self, skip: bool):
        self.skip, self.reasons = skip, collections.Counter()

    def bad(self, where: str, problem: str, reason: str) -> None:
        if not self.skip:
            raise DataError(
                f"{where}: {problem}. Fix the line, or set config.data.skip_bad_examples=True "
                "to count and skip such lines."
            )
        self.reasons[reason] += 1


def prepare_vision_data(
    processor: Any,
    source: str | list[str],
    split: str,
    options: Options,
    store_root: Path,
    limit: int = 0,
) -> VisionData:
    """The store of `source` (data files, one or several; image paths are relative to each
    file's folder; the first `limit` examples, 0: all), written on the first call, read by
    every later one."""
    sources = [source] if isinstance(source, str) else list(source)
    lines = _BadLines(options.skip_bad)
    parts: list[tuple[Path, list[Record]]] = []
    for name in sources:
        room = limit - sum(len(records) for _, records in parts) if limit else None
        records = itertools.islice(read_records(name, split, lines), room)
        parts.append((Path(name).parent, list(records)))
    key = vision_key(processor, sources, split, parts, options)
    if limit:
        key = hashlib.sha256(f"{key}/limit={limit}".encode()).hexdigest()[:32]
    tokenized = open_store(store_root, key)
    if tokenized is None:
        documents, stats = [], empty_stats() | {"images": 0}
        for root, records in parts:
            part, part_stats = tokenize_vision_records(processor, records, options, root)
            documents += part
            add_stats(stats, part_stats)
        stats["examples_read"] += sum(lines.reasons.values())
        stats["dropped"] = dict(
            sorted((collections.Counter(stats["dropped"]) + lines.reasons).items())
        )
        writer = StoreWriter(store_root, key)
        writer.append(
            from_documents([(d.tokens, d.trained) for d in documents], stats),
            [
                {**d.images, IMAGE_TOKENS: d.image_tokens, IMAGE_LABELS: _encoded(d.labels)}
                for d in documents
            ],
        )
        writer.close(stats)
        tokenized = open_store(store_root, key)
    return VisionData(tokenized, open_images(store_root, key))


def vision_key(
    processor: Any,
    sources: list[str],
    split: str,
    parts: list[tuple[Path, list[Record]]],
    options: Options,
) -> str:
    """tokenize.cache_key with the image files, the image processor and this code folded in."""
    digest = hashlib.sha256(fingerprint(sources, split).encode())
    images = []
    for root, records in parts:
        for record in records:
            try:
                images += vision_example(record.value, options.data_format, root)[1]
            except BadExample:  # tokenization names it (or counts it)
                continue
    digest.update(image_files.sources_fingerprint(images).encode())
    digest.update(processor.image_processor.to_json_string().encode())
    for name in _CODE:
        digest.update((Path(__file__).parent / name).read_bytes())
    return cache_key(digest.hexdigest(), processor.tokenizer, options)
