"""Documents -> fixed-shape [rows, T] batches: packing, padding, shuffling, resumable iteration.

The label shift happens here and only here. For one document of a row:

  tokens       = [<bos> U1  U2  A1  A2  <eot>]      trained = [0 0 0 1 1 1]
  input_ids    = [<bos> U1  U2  A1  A2  <eot>]
  target_ids   = [U1    U2  A1  A2  <eot> pad]      (position t predicts token t + 1)
  target_mask  = [0     0   1   1   1     0  ]      (= trained[t + 1]; the last token predicts
                                                      nothing, so a document's first token is
                                                      never a target of the one before it)
  positions    = [0 1 2 3 4 5]                        (restart at 0 in every document)
  segment_ids  = [k k k k k k]                        (k = 1, 2, ... per document; 0 = padding)
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator
from typing import Any

import numpy as np

from sft_jax.core.batch import BASE_KEYS, FIELDS
from sft_jax.data.records import DataError
from sft_jax.data.tokenize import Tokenized

# The arrays every batch holds, each [rows, T] (core/batch.py: the schema of every field).
BATCH_KEYS = BASE_KEYS


def best_fit(
    lengths: np.ndarray, order: np.ndarray, row_len: int, max_docs: int = 0
) -> list[list[int]]:
    """Packs documents (taken longest first, ties in `order`) into the fullest row they fit
    (the least room left, then the lowest row index), at most `max_docs` to a row (0: no
    limit).

    Returns the rows as lists of document indices. Best-fit decreasing keeps padding low; the
    caller shuffles the rows, so long and short documents still mix across batches. Open rows
    are found through a bitmap of room sizes (_OpenRows): the time per document does not grow
    with the number of open rows, so packing time stays linear in the data.
    """
    by_length = order[np.argsort(-lengths[order], kind="stable")]
    rows: list[list[int]] = []
    free = _OpenRows(row_len)
    for doc in by_length:
        need = int(lengths[doc])
        room, row = free.pop_fullest(need)
        if row >= 0:
            rows[row].append(int(doc))
            room -= need
        else:
            rows.append([int(doc)])
            row, room = len(rows) - 1, row_len - need
        if room > 0 and (max_docs <= 0 or len(rows[row]) < max_docs):
            free.add(room, row)
    return rows


class _OpenRows:
    """Rows with room left, by room size: a heap of row indices per size (lowest first) and a
    two-level bitmap of the sizes that have any (64-bit words, and one bit per nonempty word),
    so the least room >= a need is a few word operations."""

    def __init__(self, row_len: int):
        self.rows: dict[int, list[int]] = {}
        self.words = [0] * (row_len // 64 + 1)
        self.nonempty_words = 0

    def add(self, room: int, row: int) -> None:
        same_room = self.rows.get(room)
        if same_room:
            heapq.heappush(same_room, row)
            return
        self.rows[room] = [row]
        word = room >> 6
        self.words[word] |= 1 << (room & 63)
        self.nonempty_words |= 1 << word

    def pop_fullest(self, need: int) -> tuple[int, int]:
        """(room, row) of the open row with the least room >= need, removed; (-1, -1) if none."""
        word = need >> 6
        if word >= len(self.words):
            return -1, -1
        bits = self.words[word] >> (need & 63) << (need & 63)
        if not bits:
            later = self.nonempty_words >> (word + 1)
            if not later:
                return -1, -1
            word += (later & -later).bit_length()
            bits = self.words[word]
        room = (word << 6) + (bits & -bits).bit_length() - 1
        same_room = self.rows[room]
        row = heapq.heappop(same_room)
        if not same_room:
            self.words[word] &= ~(1 << (room & 63))
            if not self.words[word]:
                self.nonempty_words &= ~(1 << word)
        return room, row


def epoch_rows(
    tokenized: Tokenized,
    row_len: int,
    packing: bool,
    seed: int,
    epoch: int,
    shuffle: bool,
    max_docs: int = 0,
) -> list[list[int]]:
    """The rows of one epoch, a pure function of (data, seed, epoch)."""
    rng = np.random.default_rng([seed, epoch])
    count = len(tokenized)
    order = rng.permutation(count) if shuffle else np.arange(count)
    if not packing:
        return [[int(i)] for i in order]
    rows = best_fit(tokenized.lengths(), order, row_len, max_docs)
    if shuffle:
        rows = [rows[i] for i in rng.permutation(len(rows))]
    return rows


def make_rows(tokenized: Tokenized, rows: list[list[int]], row_len: int) -> dict[str, np.ndarray]:
    """Arrays [len(rows), row_len] of the documents of each row, padding after them."""
    out = {k: np.zeros((len(rows), row_len), FIELDS[k].dtype) for k in BASE_KEYS}
    for r, docs in enumerate(rows):
        start = 0
        for segment, doc in enumerate(docs, start=1):
            tokens, trained = tokenized.document(doc)
            end = start + len(tokens)
            if end > row_len:
                raise ValueError(f"row {r}: documents of {end} tokens exceed {row_len}.")
            out["input_ids"][r, start:end] = tokens
            out["target_ids"][r, start : end - 1] = tokens[1:]
            out["target_mask"][r, start : end - 1] = trained[1:]
            out["positions"][r, start:end] = np.arange(len(tokens))
            out["segment_ids"][r, start:end] = segment
            start = end
    return out


# The data position of the in-memory loader is tied to its documents' content (pipeline.
# content_fingerprint); checkpoints of older versions hold a cache key there instead.
DOCUMENTS_FINGERPRINT = "documents:"


def _older_fingerprint(saved: str, now: str) -> bool:
    return now.startswith(DOCUMENTS_FINGERPRINT) and not saved.startswith(DOCUMENTS_FINGERPRINT)


class TrainBatches:
    """Endless iterator of this process's rows of each global batch, epoch after epoch.

    State is the position in the row stream (epoch, row): restoring it yields exactly the
    batches an uninterrupted run would have seen next, without reading anything again.
    """

    def __init__(
        self,
        tokenized: Tokenized,
        *,
        global_rows: int,
        row_len: int,
        packing: bool,
        seed: int,
        shuffle: bool = True,
        process_index: int = 0,
        process_count: int = 1,
        fingerprint: str = "",
        max_docs: int = 0,
    ):
        if global_rows % process_count:
            raise DataError(
                f"config.train.global_batch_size={global_rows} rows does not split over "
                f"{process_count} processes (or data-parallel groups of processes); use a "
                f"multiple of {process_count}."
            )
        if len(tokenized) == 0:
            raise DataError("no training documents.")
        self.tokenized, self.row_len, self.packing = tokenized, row_len, packing
        self.seed, self.shuffle, self.fingerprint = seed, shuffle, fingerprint
        self.max_docs = max_docs
        self.global_rows = global_rows
        self.local_rows = global_rows // process_count
        self.first_local = process_index * self.local_rows
        self.epoch, self.row = 0, 0
        self._rows_of: dict[int, list[list[int]]] = {}
        # Later epochs hold no more documents to a row than the first: a bound known before
        # training (the fused cuDNN kernel is compiled for it), and as tight as the data allows.
        # The first epoch's rows are the same with or without it (no row of it holds more).
        self.max_docs = self.documents_per_row()

    def documents_per_row(self) -> int:
        """The most documents any row of any epoch holds (1 without packing)."""
        return max(len(row) for row in self._rows(0)) if self.packing else 1

    def _rows(self, epoch: int) -> list[list[int]]:
        if epoch not in self._rows_of:
            self._rows_of = {
                e: r for e, r in self._rows_of.items() if e >= epoch - 1
            }  # keep at most the previous epoch
            self._rows_of[epoch] = self.epoch_rows(epoch)
        return self._rows_of[epoch]

    def epoch_rows(self, epoch: int) -> list[list[int]]:
        """The rows of one epoch (of packing units: documents here)."""
        return epoch_rows(
            self.tokenized,
            self.row_len,
            self.packing,
            self.seed,
            epoch,
            self.shuffle,
            self.max_docs,
        )

    def rows_per_epoch(self) -> int:
        return len(self._rows(0))

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        """The next global batch's rows [first_local, first_local + local_rows)."""
        chosen = []
        for index in range(self.global_rows):
            epoch_rows_ = self._rows(self.epoch)
            if self.first_local <= index < self.first_local + self.local_rows:
                chosen.append(epoch_rows_[self.row])
            self.row += 1
            if self.row == len(epoch_rows_):
                self.epoch, self.row = self.epoch + 1, 0
        return self.make_rows(chosen)

    def make_rows(self, rows: list[list[int]]) -> dict[str, np.ndarray]:
        """The arrays of these rows (of packing units: documents here)."""
        return make_rows(self.tokenized, rows, self.row_len)

    def get_state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "row": self.row, "data_fingerprint": self.fingerprint}

    def set_state(self, state: dict[str, Any]) -> None:
        saved = state.get("data_fingerprint", self.fingerprint)
        if saved != self.fingerprint and _older_fingerprint(saved, self.fingerprint):
            raise DataError(
                "the checkpoint records its data position with an older sft_jax's fingerprint "
                "(its tokenization cache key, which changes with the code too), so this version "
                "cannot tell whether these are its documents. Resume with the sft_jax version "
                "that wrote it, or start in a new WORKDIR with "
                "config.checkpoint.init_from=<this WORKDIR> (its parameters, data from the start)."
            )
        if saved != self.fingerprint:
            raise DataError(
                "the checkpoint was trained on other data (or another tokenizer or data options):"
                " its data position does not apply. Resume with the original data, or start in "
                "a new WORKDIR (config.checkpoint.init_from can take its parameters)."
            )
        self.epoch, self.row = int(state["epoch"]), int(state["row"])


def eval_batches(
    tokenized: Tokenized,
    *,
    global_rows: int,
    row_len: int,
    packing: bool,
    process_index: int = 0,
    process_count: int = 1,
    max_docs: int = 0,
) -> list[dict[str, np.ndarray]]:
    """Every eval document exactly once, in fixed order; the last batch padded with empty rows."""
    rows = eval_rows(tokenized, row_len=row_len, packing=packing, max_docs=max_docs)
    return batches_of_rows(tokenized, rows, global_rows, row_len, process_index, process_count)


def batches_of_rows(
    tokenized: Tokenized,
    rows: list[list[int]],
    global_rows: int,
    row_len: int,
    process_index: int = 0,
    process_count: int = 1,
) -> list[dict[str, np.ndarray]]:
    """This process's share of each global batch of `rows`, the last padded with empty rows."""
    return [
        make_rows(tokenized, mine, row_len)
        for mine in local_rows(rows, global_rows, process_index, process_count)
    ]


def local_rows(
    rows: list[list[int]], global_rows: int, process_index: int = 0, process_count: int = 1
) -> list[list[list[int]]]:
    """This process's share of each global batch of `rows`, the last padded with empty rows."""
    rows = rows + [[] for _ in range(-len(rows) % global_rows)]
    local = global_rows // process_count
    return [
        rows[start + process_index * local : start + (process_index + 1) * local]
        for start in range(0, len(rows), global_rows)
    ]


def eval_rows(
    tokenized: Tokenized, *, row_len: int, packing: bool, max_docs: int = 0
) -> list[list[int]]:
    """The rows of the eval set (every process's), documents in fixed order."""
    order = np.arange(len(tokenized))
    if not packing:
        return [[int(i)] for i in order]
    return best_fit(tokenized.lengths(), order, row_len, max_docs)
