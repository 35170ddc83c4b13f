"""The tokenized store: documents on disk, written once, read by offset by every run and host.

One store is a directory named by the tokenization cache key (tokenize.cache_key: the data
fingerprint, tokenizer, template, options and span code):

  KEY/tokens.bin    int32 [total tokens]       the documents' tokens, back to back
  KEY/trained.bin   uint8 [total tokens]       1 where the token is trained
  KEY/offsets.bin   int64 [documents + 1]      document i is tokens[offsets[i]:offsets[i + 1]]
  KEY/meta.json     counts and the tokenization stats; written last, so its presence marks a
                    complete store

A store of examples with images also keeps the processor's per-image arrays (data/vision.py), so
a restart never decodes an image again; for each array NAME (e.g. pixel_values):

  KEY/image.NAME.bin          NAME's dtype, the documents' arrays back to back on axis 0
  KEY/image.NAME.offsets.bin  int64 [documents + 1]  document i has rows offsets[i]:offsets[i + 1]

meta.json's "images" holds each NAME's dtype and shape past axis 0 (`StoredImages` reads them).

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
        self.images = ImageWriter(self.temporary)

    def append(
        self, tokenized: Tokenized, images: list[dict[str, np.ndarray]] | None = None
    ) -> None:
        """Appends every document of `tokenized` (a part of the data, in order), and with
        `images` each document's image arrays by name."""
        lengths = tokenized.lengths()
        if images is not None:
            self.images.append(images, self.documents)
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
            "images": self.images.close(self.documents),
        }
        (self.temporary / "meta.json").write_text(json.dumps(meta))
        try:
            os.replace(self.temporary, self.final)
        except OSError:  # another process published the same store first: same content
            shutil.rmtree(self.temporary, ignore_errors=True)
        return self.final

    def abort(self) -> None:
        for f in [*self.files.values(), *self.images.files.values()]:
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


class ImageWriter:
    """The per-image arrays of a store's documents: one data file and one row index per name."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.files: dict[str, Any] = {}
        self.schema: dict[str, dict[str, Any]] = {}
        self.rows: dict[str, list[int]] = {}  # name -> each document's row count

    def append(self, documents: list[dict[str, np.ndarray]], before: int) -> None:
        """Each document's arrays; `before` documents precede them in the store."""
        for index, arrays in enumerate(documents):
            for name, array in arrays.items():
                self._field(name, array, before + index)
                self.files[name].write(np.ascontiguousarray(array).tobytes())
            for name, rows in self.rows.items():
                rows.append(len(arrays[name]) if name in arrays else 0)

    def _field(self, name: str, array: np.ndarray, document: int) -> None:
        schema = {"dtype": array.dtype.str, "shape": list(array.shape[1:])}
        if name not in self.schema:  # documents before this one had none of it
            self.schema[name] = schema
            self.rows[name] = [0] * document
            self.files[name] = open(self.directory / f"image.{name}.bin", "wb")  # noqa: SIM115
        elif self.schema[name] != schema:
            raise ValueError(
                f"image array {name!r} is {schema}, earlier documents' {self.schema[name]}"
            )

    def close(self, documents: int) -> dict[str, dict[str, Any]]:
        """Writes each row index; the schema meta.json keeps."""
        for name, f in self.files.items():
            f.close()
            rows = self.rows[name] + [0] * (documents - len(self.rows[name]))
            ends = np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)
            (self.directory / f"image.{name}.offsets.bin").write_bytes(ends.tobytes())
        return self.schema


class StoredImages:
    """A store's per-image arrays, read per document with pread (nothing decoded)."""

    def __init__(self, directory: Path, schema: dict[str, dict[str, Any]], documents: int):
        self.schema, self.arrays, self.offsets = schema, {}, {}
        for name, field in schema.items():
            offsets = np.fromfile(directory / f"image.{name}.offsets.bin", np.int64)
            width = int(np.prod(field["shape"], dtype=np.int64))
            path = directory / f"image.{name}.bin"
            size = path.stat().st_size // np.dtype(field["dtype"]).itemsize
            if len(offsets) != documents + 1 or size != offsets[-1] * width:
                raise ValueError(f"{path}: damaged (sizes disagree with its index)")
            self.offsets[name] = offsets
            self.arrays[name] = FileArray(path, np.dtype(field["dtype"]), size)

    def lengths(self) -> dict[str, np.ndarray]:
        """Each array's length on axis 0 in every document, by name (from the index alone)."""
        return {name: np.diff(offsets) for name, offsets in self.offsets.items()}

    def document(self, index: int) -> dict[str, np.ndarray]:
        """Document `index`'s arrays by name, images on axis 0 (none: zero rows)."""
        out = {}
        for name, field in self.schema.items():
            width = int(np.prod(field["shape"], dtype=np.int64))
            start, stop = self.offsets[name][index : index + 2] * width
            out[name] = self.arrays[name][int(start) : int(stop)].reshape(-1, *field["shape"])
        return out


def open_images(root: Path, key: str) -> StoredImages | None:
    """The per-image arrays of a complete store, or None (no store, or one without images)."""
    directory = root / key
    try:
        meta = json.loads((directory / "meta.json").read_text())
        if meta.get("version") != _VERSION or not meta.get("images"):
            return None
        return StoredImages(directory, meta["images"], meta["documents"])
    except (OSError, ValueError):
        return None  # damaged: rebuilt, never trusted
