"""The tokenized store: documents on disk, memory-mapped, written once and read by every run.

One store is a directory named by the tokenization cache key (tokenize.cache_key: the data
fingerprint, tokenizer, template, options and span code):

  KEY/tokens.bin    int32 [total tokens]       the documents' tokens, back to back
  KEY/trained.bin   uint8 [total tokens]       1 where the token is trained
  KEY/offsets.bin   int64 [documents + 1]      document i is tokens[offsets[i]:offsets[i + 1]]
  KEY/meta.json     counts and the tokenization stats; written last, so its presence marks a
                    complete store

Reading maps the files: a process touches only the pages of the documents it reads, so host
memory does not grow with the dataset. A plain memmap with an offsets index, rather than
ArrayRecord or Parquet, because a document is two contiguous slices (no decoding) and the
lengths of any set of documents are one vectorised gather; benchmarks/bench_data.py
--store measures the three.
"""

from __future__ import annotations

import json
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
        meta = {"version": _VERSION, "documents": self.documents, "tokens": self.total,
                "min_length": self.min_length, "stats": stats}  # fmt: skip
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


def open_store(root: Path, key: str) -> Tokenized | None:
    """The store's documents as memory maps, or None when it is absent or incomplete."""
    directory = root / key
    try:
        meta = json.loads((directory / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    if meta.get("version") != _VERSION:
        return None
    arrays = {}
    for name, dtype in FILES.items():
        path = directory / f"{name}.bin"
        expected = meta["documents"] + 1 if name == "offsets" else meta["tokens"]
        if path.stat().st_size != expected * np.dtype(dtype).itemsize:
            return None  # damaged: rebuilt, never trusted
        arrays[name] = np.memmap(path, dtype, mode="r") if expected else np.zeros(expected, dtype)
    stats = dict(meta["stats"], min_length=meta["min_length"])
    trained = arrays["trained"].view(np.bool_)
    return Tokenized(arrays["tokens"], trained, arrays["offsets"], stats)
