"""Documents with images -> fixed-shape rows: each document whole in one row with its images,
a row holding at most config.data.max_images_per_row images and max_image_patches_per_row
patches beside its max_length tokens. The token arrays are data/batches.py's (the label shift
there); the image arrays are the model family's (models/image_rows.py), from the processor's
outputs of the row's documents in order.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from sft_jax.core.batch import FIELDS
from sft_jax.data import batches
from sft_jax.data.records import DataError
from sft_jax.data.vision import VisionDocument
from sft_jax.data.vision_data import VisionData
from sft_jax.models.image_rows import ImageLayout


def costs(data: VisionData, layout: ImageLayout) -> np.ndarray:
    """[documents, 3] (tokens, images, patches) of each document, from the store's index."""
    out = np.zeros((len(data), 3), np.int64)
    out[:, 0] = data.tokenized.lengths()
    lengths = data.image_lengths()
    if lengths:
        out[:, 1], out[:, 2] = layout.cost(lengths)
    return out


def check_budget(cost: np.ndarray, budget: tuple[int, int, int], field: str) -> None:
    """A DataError naming the first document over the row's budget and the field to raise."""
    names = ("data.max_length", "data.max_images_per_row", "data.max_image_patches_per_row")
    for axis, (name, room) in enumerate(zip(names, budget, strict=True)):
        over = np.flatnonzero(cost[:, axis] > room)
        if len(over):
            raise DataError(
                f"{field}: document {int(over[0])} holds {int(cost[over[0], axis])} "
                f"{('tokens', 'images', 'image patches')[axis]}, over config.{name}={room}; "
                f"raise config.{name} (or use smaller or fewer images)."
            )


def pack(cost: np.ndarray, order: np.ndarray, budget: tuple, max_docs: int) -> list[list[int]]:
    """Documents (longest first, ties in `order`) each into the first row with room for its
    tokens, images and patches (and under max_docs documents; 0: no limit)."""
    by_length = order[np.argsort(-cost[order, 0], kind="stable")]
    rows: list[list[int]] = []
    room = np.zeros((0, 3), np.int64)
    limit = np.asarray(budget, np.int64)
    for doc in by_length:
        fits = np.all(room >= cost[doc], axis=1)
        if max_docs > 0:
            fits &= np.asarray([len(r) < max_docs for r in rows], bool).reshape(-1)
        open_rows = np.flatnonzero(fits)
        if len(open_rows):
            rows[open_rows[0]].append(int(doc))
            room[open_rows[0]] -= cost[doc]
        else:
            rows.append([int(doc)])
            room = np.concatenate([room, (limit - cost[doc])[None]])
    return rows


def make_rows(
    read: Callable[[int], VisionDocument], rows: list[list[int]], row_len: int, layout: ImageLayout
) -> dict[str, np.ndarray]:
    """The token arrays (batches.make_rows) and the family's image arrays of each row, document
    d being read(d)."""
    read_once = {doc: read(doc) for docs in rows for doc in docs}
    out = batches.make_rows(_Tokens(read_once), rows, row_len)
    per_row = []
    for docs in rows:
        documents = []
        for doc in docs:
            document = read_once[doc]
            documents.append({"input_ids": document.tokens, **document.images})
        per_row.append(layout.row(documents))
    for name in layout.fields:
        out[name] = np.stack([row[name] for row in per_row]).astype(FIELDS[name].dtype)
    return out


class _Tokens:
    """batches.make_rows's view of documents already read: (tokens, trained) by index."""

    def __init__(self, documents: dict[int, VisionDocument]):
        self.documents = documents

    def document(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return self.documents[index].tokens, self.documents[index].trained


class VisionTrainBatches(batches.TrainBatches):
    """TrainBatches over documents with images (the same row stream and resumable state)."""

    def __init__(self, data: VisionData, layout: ImageLayout, budget: tuple, **options: Any):
        self.data, self.layout, self.budget = data, layout, budget
        self.cost = costs(data, layout)
        check_budget(self.cost, budget, "config.data.train_files")
        super().__init__(data.tokenized, **options)

    def epoch_rows(self, epoch: int) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.data)) if self.shuffle else np.arange(len(self.data))
        if not self.packing:
            return [[int(i)] for i in order]
        rows = pack(self.cost, order, self.budget, self.max_docs)
        return [rows[i] for i in rng.permutation(len(rows))] if self.shuffle else rows

    def make_rows(self, rows: list[list[int]]) -> dict[str, np.ndarray]:
        return make_rows(self.data.document, rows, self.row_len, self.layout)


def eval_batches(
    data: VisionData,
    layout: ImageLayout,
    budget: tuple,
    *,
    global_rows: int,
    packing: bool,
    max_docs: int,
    share: tuple[int, int],
    max_examples: int = 0,
) -> tuple[list[dict[str, np.ndarray]], int]:
    """(this process's eval batches, every document (the first max_examples where that is
    positive: config.data.eval_max_examples) once in fixed order; the most documents in a row)."""
    cost = costs(data, layout)
    check_budget(cost, budget, "config.data.eval_files")
    order = np.arange(len(data))[: max_examples if max_examples > 0 else None]
    rows = pack(cost, order, budget, max_docs) if packing else [[int(i)] for i in order]
    out = [
        make_rows(data.document, mine, budget[0], layout)
        for mine in batches.local_rows(rows, global_rows, *share)
    ]
    return out, max(len(row) for row in rows)
