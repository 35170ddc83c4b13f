"""The tokenized store: documents on disk, written once, read by offset by every run and host.

One store is a directory named by the tokenization cache key (tokenize.cache_key: the data
fingerprint, tokenizer, template, options and span code):

  KEY/tokens.bin    int32 [total tokens]       the documents' tokens, back to back
  KEY/trained.bin   uint8 [total tokens]       1 where the token is trained
  KEY/offsets.bin   int64 [documents + 1]      document i is tokens[offsets[i]:offsets[i + 1]]
  KEY/meta.json     counts and the tokenization stats; written last, so its presence marks a
                    complete store

Reading copies each document out with pread (nothing of tokens.bin or trained.bin is mapped
into the process, so its resident memory holds what it copies, whatever the file's size: a
map would keep every page touched, plus the kernel's fault-around, in the process) and maps
only the offsets index, with random-access advice; the stream loader releases its pages after
each lookup (release_pages), so what the process holds of it is one window's, not 8 bytes per
document it ever read.

Raw arrays with an offsets index rather than ArrayRecord or Parquet: a document is two
contiguous reads (no decoding), the lengths of any set of documents one vectorised gather,
and on 100k documents random single-document reads ran 50x ArrayRecord's and 260x Parquet's,
writes 6x and 17x (benchmarks/bench_data_scale.py --store).
"""

from __future__ import annotations

import json
import mmap
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from sft_jax.data.tokenize import Tokenized

FILES = {"tokens": np.int32, "trained": np.uint8, "offsets": np.int64}
_VERSION = 1


class StoreWriter:
    """Appends documents to a new store in a temporary directory; `close` publishes it."""

    def __init__(self, root: Path, key: str):
        root.mkdir(parents=True, exist_ok=True)
        self.final = root / key
        self.temporary = root / f"{key}.{os.getpid()}.tmp"
        shutil.rmtree(self.temporary, ignore_errors=True)
        self.temporary.mkdir()
        # Open for the writer's life: closed by close() or abort().
        self.files = {name: open(self.temporary / f"{name}.bin", "wb") for name in FILES}  # noqa: SIM115
        self.total, self.documents, self.min_length = 0, 0, 0
        self.files["offsets"].write(np.zeros(1, np.int64).tobytes())

    def append(self, tokenized: Tokenized) -> None:
        """Appends every document of `tokenized` (a part of the data, in order)."""
        lengths = tokenized.lengths()
        if len(lengths) == 0:
            return
        self.files["tokens"].write(np.asarray(tokenized.tokens, np.int32).tobytes())
        self.files["trained"].write(np.asarray(tokenized.trained, np.uint8).tobytes())
        ends = self.total + np.cumsum(lengths, dtype=np.int64)
        self.files["offsets"].write(ends.tobytes())
        shortest = int(lengths.min())
        self.min_length = min(self.min_length or shortest, shortest)
        self.total, self.documents = int(ends[-1]), self.documents + len(lengths)

    def close(self, stats: dict[str, Any]) -> Path:
        """Writes meta.json and renames the directory into place (a crash leaves no store)."""
        for f in self.files.values():
            f.close()
        meta = {
            "version": _VERSION,
            "documents": self.documents,
            "tokens": self.total,
            "min_length": self.min_length,
            "stats": stats,
        }
        (self.temporary / "meta.json").write_text(json.dumps(meta))
        try:
            os.replace(self.temporary, self.final)
        except OSError:  # another process published the same store first: same content
            shutil.rmtree(self.temporary, ignore_errors=True)
        return self.final

    def abort(self) -> None:
        for f in self.files.values():
            f.close()
        shutil.rmtree(self.temporary, ignore_errors=True)


class FileArray:
    """A 1-D array in a file, read by slices (`a[i:j]`) with pread."""

    def __init__(self, path: Path, dtype: Any, size: int):
        self.path, self.dtype, self.size = path, np.dtype(dtype), size
        self.fd = os.open(path, os.O_RDONLY)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: slice) -> np.ndarray:
        start, stop, step = index.indices(self.size)
        if step != 1:
            raise IndexError("FileArray reads contiguous slices only.")
        count = max(0, stop - start)
        data = os.pread(self.fd, count * self.dtype.itemsize, start * self.dtype.itemsize)
        return np.frombuffer(data, self.dtype)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return self[:].astype(dtype or self.dtype)

    def __del__(self, close: Any = os.close) -> None:  # os may be gone at interpreter exit
        close(self.fd)


def _mapped_index(path: Path) -> np.ndarray:
    """The offsets, mapped read-only with MADV_RANDOM (no read-ahead around each lookup)."""
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    mapped.madvise(mmap.MADV_RANDOM)
    return np.frombuffer(mapped, np.int64)


def release_pages(index: np.ndarray) -> None:
    """Drops the pages of a mapped index (and of any array over the same map) from this
    process's resident memory. They stay in the page cache, so a later lookup maps one back
    for a minor fault; without this every page ever looked up stays resident, and the index
    held grows with the documents read (8 bytes each) instead of staying one window's."""
    base = index
    while isinstance(base, np.ndarray):
        base = base.base
    if isinstance(base, memoryview) and isinstance(base.obj, mmap.mmap):
        base.obj.madvise(mmap.MADV_DONTNEED)


def open_store(root: Path, key: str) -> Tokenized | None:
    """The store's documents as memory maps, or None when it is absent or incomplete."""
    directory = root / key
    try:
        meta = json.loads((directory / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    if meta.get("version") != _VERSION:
        return None
    for name, dtype in FILES.items():
        expected = meta["documents"] + 1 if name == "offsets" else meta["tokens"]
        if (directory / f"{name}.bin").stat().st_size != expected * np.dtype(dtype).itemsize:
            return None  # damaged: rebuilt, never trusted
    stats = dict(meta["stats"], min_length=meta["min_length"])
    tokens = FileArray(directory / "tokens.bin", np.int32, meta["tokens"])
    trained = FileArray(directory / "trained.bin", np.bool_, meta["tokens"])
    return Tokenized(tokens, trained, _mapped_index(directory / "offsets.bin"), stats)
