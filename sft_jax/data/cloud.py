"""Files in buckets: s3:// and gs:// paths read and written through fsspec (s3fs, gcsfs).

The one owner of bucket access: data files are read here, and a bucket WORKDIR's staged
checkpoints, metrics and export (sft_jax.workdir.bucket_mirror) are listed, written and
deleted here.

Credentials come from the environment the usual way: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY,
AWS_PROFILE or an instance role for s3:// (AWS_ENDPOINT_URL for another S3 API); application
default credentials (GOOGLE_APPLICATION_CREDENTIALS, `gcloud auth application-default login`)
for gs://. Every failure is a CloudError naming the path and what to check.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from sft_jax.core.errors import UserError

PREFIXES = ("s3://", "gs://", "gcs://")
_SETTINGS = ("AWS_", "GOOGLE_", "GCE_", "CLOUDSDK_")  # environment variables clients read
_CHECK = {
    "s3": "the bucket and key exist and the credentials (AWS_ACCESS_KEY_ID / "
    "AWS_SECRET_ACCESS_KEY, AWS_PROFILE or an instance role; AWS_ENDPOINT_URL for another S3 "
    "API) may {access} them",
    "gs": "the bucket and object exist and the application default credentials "
    "(GOOGLE_APPLICATION_CREDENTIALS or `gcloud auth application-default login`) may {access} them",
}


class CloudError(UserError):
    """A bucket path that cannot be listed, read, written or deleted."""


def is_remote(path: str) -> bool:
    return path.startswith(PREFIXES)


def _filesystem(path: str) -> Any:
    """A client for the path's protocol and the credentials the environment names now."""
    settings = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(_SETTINGS)))
    return _client(_protocol(path), settings)


@functools.lru_cache(maxsize=8)
def _client(protocol: str, settings: tuple[tuple[str, str], ...]) -> Any:
    """One client per protocol and credential settings (making one costs a botocore or
    google-auth session): a changed AWS_* / GOOGLE_* variable makes a new one, so old
    credentials are never kept; listings are never cached, so every listing is the bucket's."""
    import fsspec

    del settings  # part of the cache key only: the client reads the environment itself
    return fsspec.filesystem(protocol, skip_instance_cache=True, use_listings_cache=False)


def _protocol(path: str) -> str:
    return "s3" if path.startswith("s3://") else "gs"


@contextlib.contextmanager
def _named(path: str, action: str = "read") -> Iterator[None]:
    """Any failure of the storage client as one line naming the path."""
    try:
        yield
    except CloudError:
        raise
    except Exception as e:  # botocore, google-auth and fsspec errors share no base class
        problem = f"{type(e).__name__}: {str(e)[:300]}"
        access = "read" if action == "read" else "read and write"
        check = _CHECK[_protocol(path)].format(access=access)
        raise CloudError(f"{path}: cannot {action} it ({problem}). Check that {check}.") from None


def _key(url: str) -> str:
    """'s3://bucket/a/b' -> 'bucket/a/b' (fsspec's names carry no protocol)."""
    return url.split("://", 1)[1].rstrip("/")


def glob(pattern: str) -> list[str]:
    """The objects matching a path or glob, sorted, each with its protocol."""
    prefix = pattern.split("://", 1)[0] + "://"
    with _named(pattern):
        fs = _filesystem(pattern)
        fs.ls(_key(pattern).split("/", 1)[0])  # a missing bucket fails here
        return sorted(prefix + p.removeprefix(prefix) for p in fs.glob(pattern))


def open_file(path: str) -> IO[bytes]:
    """The object, opened for reading (binary)."""
    with _named(path):
        return _filesystem(path).open(path, "rb")


def size(path: str) -> int:
    """The object's size in bytes."""
    with _named(path):
        return int(_filesystem(path).size(path))


def version(path: str) -> str:
    """Changes when the object does: its ETag or generation, size and modification time."""
    with _named(path):
        info = _filesystem(path).info(path)
    fields = ("ETag", "etag", "generation", "size", "LastModified", "mtime", "updated")
    return hashlib.sha256(repr([(k, str(info.get(k))) for k in fields]).encode()).hexdigest()


def check_bucket(url: str) -> None:
    """A CloudError naming `url` where its bucket is missing or the credentials cannot list it."""
    with _named(url, "list"):
        _filesystem(url).ls(_key(url).split("/", 1)[0])


def list_tree(url: str) -> dict[str, int]:
    """Every object under the prefix `url`: its path relative to `url` -> its size in bytes."""
    with _named(url, "list"):
        found = _filesystem(url).find(_key(url), detail=True)
    root = _key(url) + "/"
    return {
        name.removeprefix(root): int(info.get("size") or 0)
        for name, info in found.items()
        if name.startswith(root)
    }


def put_files(pairs: list[tuple[Path, str]]) -> None:
    """Uploads each local file to its URL (one client for all of them)."""
    if not pairs:
        return
    fs = _filesystem(pairs[0][1])
    for local, url in pairs:
        with _named(url, "write"):
            fs.put_file(str(local), _key(url))


def get_files(pairs: list[tuple[str, Path]]) -> None:
    """Downloads each URL to its local file (parent folders made)."""
    if not pairs:
        return
    fs = _filesystem(pairs[0][0])
    for url, local in pairs:
        local.parent.mkdir(parents=True, exist_ok=True)
        with _named(url):
            fs.get_file(_key(url), str(local))


def write_text(url: str, text: str) -> None:
    with _named(url, "write"):
        _filesystem(url).pipe_file(_key(url), text.encode())


def read_text(url: str) -> str:
    with _named(url):
        return _filesystem(url).cat_file(_key(url)).decode()


def delete(urls: list[str]) -> None:
    """Deletes the objects, in the order given (a marker first: readers never see it alone)."""
    if not urls:
        return
    fs = _filesystem(urls[0])
    for url in urls:
        with _named(url, "delete"):
            fs.rm_file(_key(url))
