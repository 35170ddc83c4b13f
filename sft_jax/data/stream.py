"""Training rows streamed from tokenized stores: weighted mixtures, windows, each process its share.

The global document stream is a pure function of (seed, weights, store sizes), so every process
computes the same one without talking to the others:

  window j      takes, from source i, its documents C_i(j) .. C_i(j + 1) - 1 where
                C_i(j) = floor(j * W * w_i + 0.5)   (W = config.data.stream_window documents,
                w = the normalised weights: proportions exact to half a document per window)
  document q    of source i is doc index_shuffle(q mod n_i) of epoch q // n_i (a fresh
                permutation per epoch, so a small source repeats, reshuffled, as it must)
  rows          the window's documents packed best-fit (lengths only: the offsets index), then
                shuffled; global batch b is rows b*R .. (b+1)*R - 1 of the window sequence

A process reads the tokens of its own rows of each batch only (the memory maps page in just
those), and memory holds one window, whatever the dataset's size. The iterator state is the
(window, row) position: JSON, identical on every process, restored exactly.

Grain's MapDataset has these properties too (seeded index shuffle, weighted mix, repeat), but
one index costs ~93 us (shuffle) and ~725 us (mix) from Python against ~1 us vectorised here
(benchmarks/bench_data_scale.py --store): a window of 8192 documents would take ~6 s to mix.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sft_jax.data.batches import TrainBatches, best_fit
from sft_jax.data.records import DataError
from sft_jax.data.store import release_pages
from sft_jax.data.tokenize import Tokenized

_ROUNDS = 4  # Feistel rounds: enough to mix, cheap


def index_shuffle(positions: np.ndarray, size: int, seed: tuple[int, ...]) -> np.ndarray:
    """A seeded permutation of range(size) evaluated at `positions` (each in [0, size)), in
    O(len(positions)) memory: a Feistel network over the next even power of two, cycle-walking
    back into range (a bijection on [0, size) because the network is one on the larger
    domain; a start outside [0, size) could cycle outside it forever)."""
    bits = max(2, (size - 1).bit_length())
    bits += bits % 2
    half, mask = bits // 2, np.uint64((1 << (bits // 2)) - 1)
    keys = np.random.default_rng(list(seed)).integers(0, 2**62, _ROUNDS, dtype=np.uint64)

    def permute(x: np.ndarray) -> np.ndarray:
        left, right = x >> np.uint64(half), x & mask
        for key in keys:
            mixed = (right + key) * np.uint64(0x9E3779B97F4A7C15)
            mixed ^= mixed >> np.uint64(29)
            left, right = right, (left ^ mixed) & mask
        return (left << np.uint64(half)) | right

    out = permute(np.asarray(positions, np.uint64))
    outside = out >= size
    while outside.any():
        out[outside] = permute(out[outside])
        outside = out >= size
    return out.astype(np.int64)


class Documents:
    """Several stores as one sequence of documents (source i's doc d is bases[i] + d); counts
    the documents whose tokens were read."""

    def __init__(self, stores: list[Tokenized]):
        self.stores = stores
        self.sizes = np.array([len(s) for s in stores], np.int64)
        self.bases = np.concatenate([[0], np.cumsum(self.sizes)])
        self.read = 0  # documents whose tokens this process read

    def __len__(self) -> int:
        return int(self.bases[-1])

    def lengths(self, refs: np.ndarray) -> np.ndarray:
        """Token counts of these documents, from the offsets indexes only."""
        source = np.searchsorted(self.bases, refs, side="right") - 1
        out = np.empty(len(refs), np.int64)
        for i, store in enumerate(self.stores):
            local = refs[source == i] - self.bases[i]
            out[source == i] = store.offsets[local + 1] - store.offsets[local]
        self.release()
        return out

    def release(self) -> None:
        """Drops the offsets pages looked up so far from resident memory (store.release_pages)."""
        for store in self.stores:
            release_pages(store.offsets)

    def document(self, ref: int) -> tuple[np.ndarray, np.ndarray]:
        self.read += 1
        source = int(np.searchsorted(self.bases, ref, side="right")) - 1
        return self.stores[source].document(int(ref - self.bases[source]))


def window_counts(window: int, size: int, weights: np.ndarray) -> np.ndarray:
    """Documents of each source consumed before `window` (C_i above)."""
    return np.floor(window * size * weights + 0.5).astype(np.int64)


class StreamBatches(TrainBatches):
    """TrainBatches over a mixture stream: its "epoch" is a window of the stream."""

    def __init__(
        self,
        documents: Documents,
        weights: list[float],
        *,
        window: int,
        seed: int,
        shuffle: bool,
        max_docs: int,
        **rows: Any,
    ):
        if not len(weights) or min(documents.sizes) == 0 or len(documents.sizes) != len(weights):
            raise DataError("every source of config.data.mixture needs training documents.")
        self.documents, self.window = documents, window
        self.weights = np.asarray(weights, np.float64) / np.sum(weights)
        min_length = min(int(s.stats.get("min_length", 1)) or 1 for s in documents.stores)
        # The bound compiled into the attention kernel: no row holds more documents than this.
        self.bound = max_docs or max(1, rows["row_len"] // min_length)
        super().__init__(documents, seed=seed, shuffle=shuffle, max_docs=max_docs, **rows)

    def documents_per_row(self) -> int:
        return self.bound if self.packing else 1

    def window_documents(self, window: int) -> np.ndarray:
        """The global document ids of one window, in stream order."""
        start = window_counts(window, self.window, self.weights)
        end = window_counts(window + 1, self.window, self.weights)
        parts = []
        for i, size in enumerate(self.documents.sizes):
            q = np.arange(start[i], end[i], dtype=np.int64)
            epoch, index = q // size, q % size
            if self.shuffle:
                for e in np.unique(epoch):
                    chosen = epoch == e
                    index[chosen] = index_shuffle(index[chosen], int(size), (self.seed, i, int(e)))
            parts.append(self.documents.bases[i] + index)
        refs = np.concatenate(parts)
        if self.shuffle:  # interleave the sources within the window
            refs = refs[np.random.default_rng([self.seed, window, 1]).permutation(len(refs))]
        return refs

    def epoch_rows(self, window: int) -> list[list[int]]:
        refs = self.window_documents(window)
        if not self.packing:
            return [[int(r)] for r in refs]
        rows = self.pack_window(refs)
        if self.shuffle:
            order = np.random.default_rng([self.seed, window, 2]).permutation(len(rows))
            rows = [rows[i] for i in order]
        return [[int(refs[d]) for d in row] for row in rows]

    def pack_window(self, refs: np.ndarray) -> list[list[int]]:
        """The window's documents (positions in `refs`) packed best-fit into rows."""
        lengths = self.documents.lengths(refs)
        return best_fit(lengths, np.arange(len(refs)), self.row_len, self.bound)

    def make_rows(self, rows: list[list[int]]) -> dict[str, np.ndarray]:
        out = super().make_rows(rows)
        self.documents.release()  # the offsets of this batch's documents: not kept resident
        return out

    def get_state(self) -> dict[str, Any]:
        return {**super().get_state(), "loader": "stream"}

    def set_state(self, state: dict[str, Any]) -> None:
        if state.get("loader") != "stream":
            raise DataError(
                "the checkpoint was written with config.data.loader='memory': its data position "
                "does not apply to the stream loader. Resume with the loader it was trained "
                "with, or start in a new WORKDIR."
            )
        super().set_state(state)


def window_options(data: Any, seed: int, global_rows: int, process: tuple[int, int]) -> dict:
    """The streamed batches' options from config.data (a DataSpec), the run's seed, its global
    batch rows and this process's (index, count) share of them."""
    return {
        "window": data.stream_window,
        "seed": seed,
        "shuffle": data.shuffle,
        "max_docs": data.max_documents_per_row,
        "global_rows": global_rows,
        "row_len": data.max_length,
        "packing": data.packing,
        "process_index": process[0],
        "process_count": process[1],
    }
