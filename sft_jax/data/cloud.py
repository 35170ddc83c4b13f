"""Data files in buckets: s3:// and gs:// paths read through fsspec (s3fs, gcsfs).

Credentials come from the environment the usual way: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY,
AWS_PROFILE or an instance role for s3:// (AWS_ENDPOINT_URL for another S3 API); application
default credentials (GOOGLE_APPLICATION_CREDENTIALS, `gcloud auth application-default login`)
for gs://. Every failure is a DataError naming the path and what to check.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from typing import IO, Any

from sft_jax.errors import UserError

PREFIXES = ("s3://", "gs://", "gcs://")
_CHECK = {
    "s3": "the bucket and key exist and the credentials (AWS_ACCESS_KEY_ID / "
    "AWS_SECRET_ACCESS_KEY, AWS_PROFILE or an instance role; AWS_ENDPOINT_URL for another S3 "
    "API) may read them",
    "gs": "the bucket and object exist and the application default credentials "
    "(GOOGLE_APPLICATION_CREDENTIALS or `gcloud auth application-default login`) may read them",
}


class CloudError(UserError):
    """A bucket path that cannot be listed or read."""


def is_remote(path: str) -> bool:
    return path.startswith(PREFIXES)


def _filesystem(path: str) -> Any:
    import fsspec

    # A fresh client each time: a cached one would keep old credentials and old listings.
    return fsspec.core.url_to_fs(path, skip_instance_cache=True, use_listings_cache=False)[0]


def _protocol(path: str) -> str:
    return "s3" if path.startswith("s3://") else "gs"


@contextlib.contextmanager
def _named(path: str) -> Iterator[None]:
    """Any failure of the storage client as one line naming the path."""
    try:
        yield
    except CloudError:
        raise
    except Exception as e:  # botocore, google-auth and fsspec errors share no base class
        problem = f"{type(e).__name__}: {str(e)[:300]}"
        raise CloudError(
            f"{path}: cannot read it ({problem}). Check that {_CHECK[_protocol(path)]}."
        ) from None


def glob(pattern: str) -> list[str]:
    """The objects matching a path or glob, sorted, each with its protocol."""
    prefix = pattern.split("://", 1)[0] + "://"
    with _named(pattern):
        fs = _filesystem(pattern)
        fs.ls(pattern.split("://", 1)[1].split("/", 1)[0])  # a missing bucket fails here
        return sorted(prefix + p.removeprefix(prefix) for p in fs.glob(pattern))


def open_file(path: str) -> IO[bytes]:
    """The object, opened for reading (binary)."""
    with _named(path):
        return _filesystem(path).open(path, "rb")


def version(path: str) -> str:
    """Changes when the object does: its ETag or generation, size and modification time."""
    with _named(path):
        info = _filesystem(path).info(path)
    fields = ("ETag", "etag", "generation", "size", "LastModified", "mtime", "updated")
    return hashlib.sha256(repr([(k, str(info.get(k))) for k in fields]).encode()).hexdigest()
