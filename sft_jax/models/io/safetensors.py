"""Streaming safetensors: read any slice of a tensor from disk, write tensor by tensor.

The format (https://huggingface.co/docs/safetensors) is an 8-byte little-endian header length,
a JSON header {name: {dtype, shape, data_offsets: [begin, end]}} and the raw little-endian data.
Reading fetches only the rows a slice covers, in chunks, so a loader holds at most one tensor
slice in host memory at a time; writing streams one tensor at a time.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import ml_dtypes
import numpy as np

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_CHUNK_BYTES = 16 * 1024**2
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class CheckpointFormatError(ValueError):
    """A safetensors file or index is malformed; the message names the file."""


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: file, dtype, shape and absolute byte offset of its data."""

    path: Path
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int

    def read(self, index: tuple[slice, ...] | None = None) -> np.ndarray:
        """Reads `tensor[index]` (all of it when index is None) from the file.

        Only the rows the first slice selects are read, in chunks of about 16 MB whose other
        axes are cut right away, so memory beyond the result stays one chunk.
        """
        index = tuple(index or ())
        if not self.shape or 0 in self.shape:
            return np.zeros(self.shape, self.dtype)[index]
        rows = range(self.shape[0])[index[0]] if index else range(self.shape[0])
        rest = (slice(None), *index[1:])
        if rows.step != 1:
            return self.read()[index]
        row_items = int(np.prod(self.shape[1:], dtype=np.int64))
        result_shape = (len(rows), *np.empty((1, *self.shape[1:]), np.bool_)[rest].shape[1:])
        result = np.empty(result_shape, self.dtype)
        chunk_rows = max(1, _CHUNK_BYTES // (row_items * self.dtype.itemsize))
        for start in range(0, len(rows), chunk_rows):
            count = min(chunk_rows, len(rows) - start)
            block = np.fromfile(
                self.path,
                dtype=self.dtype,
                count=count * row_items,
                offset=self.offset + (rows.start + start) * row_items * self.dtype.itemsize,
            ).reshape((count, *self.shape[1:]))
            result[start : start + count] = block[rest]
        return result


def read_header(path: Path) -> dict[str, TensorEntry]:
    """Parses one .safetensors file's header into TensorEntry records."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw_length = f.read(8)
        if len(raw_length) != 8:
            raise CheckpointFormatError(f"{path}: too short to be a safetensors file.")
        header_length = int.from_bytes(raw_length, "little")
        if header_length > size - 8:
            raise CheckpointFormatError(f"{path}: header length {header_length} exceeds file size.")
        try:
            header = json.loads(f.read(header_length))
        except json.JSONDecodeError as e:
            raise CheckpointFormatError(f"{path}: header is not valid JSON ({e}).") from e
    data_start = 8 + header_length
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in DTYPES:
            raise CheckpointFormatError(
                f"{path}: tensor {name} has unsupported dtype {info['dtype']}."
            )
        begin, end = info["data_offsets"]
        if data_start + end > size:
            raise CheckpointFormatError(
                f"{path}: tensor {name} ends past the end of the file (truncated download?)."
            )
        entries[name] = TensorEntry(
            path, DTYPES[info["dtype"]], tuple(info["shape"]), data_start + begin
        )
    return entries


def read_checkpoint(model_dir: Path) -> dict[str, TensorEntry]:
    """All tensors of a directory holding model.safetensors or a sharded index."""
    index_path = model_dir / INDEX_FILE
    if index_path.exists():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointFormatError(
                f"{index_path}: not a valid safetensors index ({e})."
            ) from e
        entries: dict[str, TensorEntry] = {}
        for file_name in sorted(set(weight_map.values())):
            shard = model_dir / file_name
            if not shard.exists():
                raise CheckpointFormatError(f"{index_path}: lists {file_name}, which is missing.")
            entries.update(read_header(shard))
        return entries
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointFormatError(f"{model_dir}: no *.safetensors files found.")
    entries = {}
    for path in files:
        entries.update(read_header(path))
    return entries


@dataclasses.dataclass(frozen=True)
class PendingTensor:
    """A tensor to write: its name, shape, dtype, and a function producing its host array."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    produce: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def write_file(path: Path, tensors: list[PendingTensor], metadata: dict[str, str]) -> None:
    """Writes one safetensors file, producing (and dropping) one tensor at a time."""
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for t in tensors:
        header[t.name] = {
            "dtype": _NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # data starts 8-byte aligned
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as f:
        f.write(len(header_bytes).to_bytes(8, "little"))
        f.write(header_bytes)
        for t in tensors:
            array = np.ascontiguousarray(t.produce(), dtype=t.dtype)
            if array.shape != t.shape:
                raise ValueError(f"{t.name}: produced shape {array.shape}, expected {t.shape}.")
            f.write(array.tobytes())
    os.replace(tmp, path)


def _shard_groups(
    tensors: Iterable[PendingTensor], max_shard_bytes: int
) -> list[list[PendingTensor]]:
    groups: list[list[PendingTensor]] = [[]]
    size = 0
    for t in tensors:
        if groups[-1] and size + t.nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.nbytes
    return groups


def write_checkpoint(
    out_dir: Path, tensors: list[PendingTensor], max_shard_bytes: int, *, write: bool = True
) -> list[str]:
    """Writes model.safetensors, or numbered shards plus model.safetensors.index.json.

    With write=False every tensor is still produced (so collective gathers run on every host)
    but nothing is written; returns the file names.
    """
    groups = _shard_groups(tensors, max_shard_bytes)
    metadata = {"format": "pt"}  # what transformers expects of safetensors it loads
    if len(groups) == 1:
        names = [SINGLE_FILE]
    else:
        names = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    for name, group in zip(names, groups, strict=True):
        if write:
            write_file(out_dir / name, group, metadata)
        else:
            for t in group:
                t.produce()
    if write and len(groups) > 1:
        index = {
            "metadata": {"total_size": sum(t.nbytes for t in tensors)},
            "weight_map": {t.name: name for name, g in zip(names, groups, strict=True) for t in g},
        }
        (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return names
