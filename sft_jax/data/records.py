"""Raw examples from local files (JSONL, JSON, Parquet, CSV) or hub datasets, with provenance.

Every record remembers where it came from ("train.jsonl:12", "data.parquet: row 7") so that a
problem found later (a missing field, an unknown role) can name the file and line or row.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import glob
import hashlib
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sft_jax.core.errors import UserError
from sft_jax.data import cloud

SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
HUB_PREFIX = "hf:"


class DataError(UserError):
    """Bad input data or data config; the message names the file, line or field and the fix."""


@dataclasses.dataclass(frozen=True)
class Record:
    """One raw example and where it was read from."""

    where: str
    value: Any


def expand_sources(spec: str, field: str) -> list[str]:
    """Comma-separated paths, globs or `hf:NAME[:CONFIG]` ids -> a sorted list of sources."""
    sources = []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        if item.startswith(HUB_PREFIX):
            sources.append(item)
            continue
        if cloud.is_remote(item):
            matches = cloud.glob(item)
        else:
            matches = sorted(glob.glob(str(Path(item).expanduser())))
        if not matches:
            raise DataError(
                f"{field}={item!r}: no such file. Give local paths or globs of "
                f"{', '.join(SUFFIXES)} files, or a hub dataset as '{HUB_PREFIX}NAME'."
            )
        for match in matches:
            if Path(match).suffix not in SUFFIXES:
                raise DataError(
                    f"{field}: {match} has an unsupported suffix; expected one of "
                    f"{', '.join(SUFFIXES)}."
                )
        sources.extend(matches)
    if not sources:
        raise DataError(f"{field} is empty: name at least one data file.")
    return sources


def fingerprint(sources: list[str], split: str) -> str:
    """Changes whenever a source's content changes (local files are hashed, hub ids by name)."""
    digest = hashlib.sha256(split.encode())
    for source in sources:
        digest.update(source.encode())
        if source.startswith(HUB_PREFIX):
            continue
        if cloud.is_remote(source):  # the object's version, not its bytes (no download)
            digest.update(cloud.version(source).encode())
            continue
        with open(source, "rb") as f:
            while chunk := f.read(1 << 20):  # 1 MiB at a time: memory flat with the size
                digest.update(chunk)
    return digest.hexdigest()


def read_records(source: str, split: str, errors: Any) -> Iterator[Record]:
    """Records of one source. Unparseable lines go to `errors.bad(where, problem)`."""
    if source.startswith(HUB_PREFIX):
        yield from _hub_records(source, split)
        return
    suffix = Path(source).suffix
    if suffix == ".jsonl":
        yield from _jsonl_records(source, errors)
    elif suffix == ".json":
        yield from _json_records(source)
    elif suffix == ".parquet":
        yield from _parquet_records(source)
    else:
        yield from _csv_records(source)


def _open(path: str) -> Any:
    return cloud.open_file(path) if cloud.is_remote(path) else open(path, "rb")


def _jsonl_records(path: str, errors: Any) -> Iterator[Record]:
    with _open(path) as f:
        for number, raw in enumerate(f, start=1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                errors.bad(where, _not_utf8(e), "not_utf8")
                continue
            if not line.strip():
                continue
            try:
                yield Record(where, json.loads(line))
            except json.JSONDecodeError as e:
                errors.bad(where, f"invalid JSON ({e.msg} at column {e.colno})", "invalid_json")


def _not_utf8(error: UnicodeDecodeError) -> str:
    byte = error.object[error.start : error.start + 1].hex()
    return f"not UTF-8 text (byte 0x{byte} at column {error.start + 1}); re-save the file as UTF-8"


def _text(path: str) -> str:
    """A whole file as UTF-8 text; a stray byte is named with its line."""
    with _open(path) as f:
        data = f.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: {_not_utf8(e)}.") from None


def _json_records(path: str) -> Iterator[Record]:
    try:
        data = json.loads(_text(path))
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno}). A .json file must "
            "hold one array of examples; use .jsonl for one example per line."
        ) from e
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of examples, got {type(data).__name__}.")
    for index, value in enumerate(data):
        yield Record(f"{path}: item {index}", value)


def _parquet_records(path: str) -> Iterator[Record]:
    import pyarrow
    import pyarrow.parquet as pq

    row = 0
    try:
        for batch in pq.ParquetFile(_open(path)).iter_batches(batch_size=4096):
            for value in batch.to_pylist():
                yield Record(f"{path}: row {row}", value)
                row += 1
    except (pyarrow.ArrowException, OSError) as e:
        raise DataError(
            f"{path}: not a readable Parquet file after {row} rows ({type(e).__name__}: "
            f"{str(e)[:200]}). Write it again, or leave it out of the config's data files."
        ) from None


def _csv_records(path: str) -> Iterator[Record]:
    # Line 1 is the header; a row spanning several lines is named by its first one.
    reader = csv.DictReader(io.StringIO(_text(path), newline=""))
    for value in reader:
        yield Record(f"{path}:{reader.line_num}", _decode_json_cells(value))


def _decode_json_cells(value: dict[str, Any]) -> dict[str, Any]:
    """CSV cells that hold JSON lists (messages, conversations) become lists."""
    out = {}
    for key, cell in value.items():
        if isinstance(cell, str) and cell.lstrip().startswith("["):
            with contextlib.suppress(json.JSONDecodeError):
                cell = json.loads(cell)
        out[key] = cell
    return out


def _hub_records(source: str, split: str) -> Iterator[Record]:
    import datasets

    name, _, subset = source[len(HUB_PREFIX) :].partition(":")
    try:
        dataset = datasets.load_dataset(name, subset or None, split=split or "train")
    except Exception as e:  # offline, unknown name or split: one line that says so
        raise DataError(
            f"{source} (split {split or 'train'!r}): loading from the Hugging Face hub failed "
            f"({type(e).__name__}: {str(e)[:300]}). Check the name, the split and the network, "
            "or download the data and point the config at local files."
        ) from e
    for index, value in enumerate(dataset):
        yield Record(f"{source}[{split or 'train'}]: row {index}", value)
