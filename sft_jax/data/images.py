"""The images of a chat example: where each comes from, read and decoded offline, with errors
that name the image.

Two ways to give them (TRL's vision format and OpenAI's), in message content parts:

  {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]}],
   "images": ["photos/cat.png"]}
  {"messages": [{"role": "user", "content": [
      {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBOR..."}},
      {"type": "text", "text": "What?"}]}, ...]}

The k-th `{"type": "image"}` part takes the k-th entry of `images`: a path (relative to the data
file's folder), `{"bytes": ..., "path": ...}` (how `datasets` stores an Image feature in
Parquet) or a decoded PIL image (a hub dataset's Image column); a part that names its own image
(`{"type": "image", "image": "cat.png"}`, or "path" / "url" as transformers' templates take)
takes that instead. An `image_url` part holds a
`data:` URI, a local path or `file://` URL. http(s) URLs are refused: data is read offline.
Every image part becomes `{"type": "image"}`, what the chat templates of vision models render.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import io
import itertools
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sft_jax.data.messages import SCAN_RECORDS, BadExample

IMAGE_PART = {"type": "image"}
_REMOTE = ("http://", "https://")


@dataclasses.dataclass(frozen=True)
class ImageSource:
    """One image of an example: its place (0-based, in conversation order) and where it is."""

    index: int
    value: Any  # a path or URL string, {"bytes", "path"}, or a PIL image
    root: Path  # the folder relative paths start from

    def label(self) -> str:
        """How the image is named in messages: its path, a shortened URI, or its kind."""
        value = self.value
        if isinstance(value, dict):
            return str(value.get("path") or "bytes")
        if isinstance(value, str):
            return value if len(value) <= 60 else value[:40] + "..."
        return type(value).__name__

    def name(self, where: str) -> str:
        """How a logged eval sample names the image: the path the example gives, else its
        place ("image 2 of eval.jsonl:7" for bytes, a data: URI or a decoded image)."""
        value = self.value.get("path") if isinstance(self.value, dict) else self.value
        if isinstance(value, str) and not value.startswith("data:"):
            return value
        return f"image {self.index + 1} of {Path(where).name}"

    def local_path(self) -> Path | None:
        """The file this image is read from, or None (bytes, data: URI, decoded image)."""
        value = self.value
        if isinstance(value, dict):
            value = None if value.get("bytes") else value.get("path")
        if not isinstance(value, str) or value.startswith(("data:", *_REMOTE)):
            return None
        value = value.removeprefix("file://")
        path = Path(value).expanduser()
        return path if path.is_absolute() else self.root / path


def any_has_images(values: Iterable[Any]) -> bool:
    """Does one of the first SCAN_RECORDS raw examples hold an image?"""
    return any(has_images(value) for value in itertools.islice(values, SCAN_RECORDS))


def has_images(value: Any) -> bool:
    """Does a raw example hold an image (an `images` column or an image part)?"""
    if not isinstance(value, dict):
        return False
    if value.get("images"):
        return True
    messages = value.get("messages")
    return isinstance(messages, list) and any(
        isinstance(part, dict) and part.get("type") in ("image", "image_url")
        for message in messages
        if isinstance(message, dict) and isinstance(message.get("content"), list)
        for part in message["content"]
    )


def image_parts(messages: Any, column: Any, root: Path) -> tuple[Any, list[ImageSource]]:
    """The messages with every image part as {"type": "image"}, and the image sources in
    order. The `images` column must hold one image per {"type": "image"} part."""
    column = [] if column is None else column
    if not isinstance(column, list):
        raise BadExample(
            f"field 'images' must be a list of images, got {type(column).__name__}",
            "mistyped_field",
        )
    if not isinstance(messages, list):
        return messages, []  # formats.normalize names the problem
    sources: list[ImageSource] = []
    taken = 0
    out = []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            out.append(message)
            continue
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            inline = _inline(part) if kind == "image" else None
            if kind == "image" and inline is None:
                value = column[taken] if taken < len(column) else None
                taken += 1
            elif kind == "image":
                value = inline
            elif kind == "image_url":
                value = _url(part.get("image_url"), len(sources))
            else:  # null fields (a Parquet struct's) left out: templates test `'image' in part`
                parts.append(_present(part) if isinstance(part, dict) else part)
                continue
            sources.append(ImageSource(len(sources), value, root))
            parts.append(dict(IMAGE_PART))
        out.append({**message, "content": parts})
    if taken != len(column):
        raise BadExample(
            f"the messages have {taken} {{'type': 'image'}} parts but field 'images' holds "
            f"{len(column)} images; give one image per part, in order",
            "image_count_mismatch",
        )
    return out, sources


def _inline(part: dict) -> Any:
    """The image an image part carries itself ({"type": "image", "image": "cat.png"}), or None."""
    return next((part[key] for key in ("image", "path", "url") if part.get(key) is not None), None)


def _present(part: dict) -> dict:
    return {key: value for key, value in part.items() if value is not None}


def _url(value: Any, index: int) -> str:
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str):
        raise BadExample(
            f"image {index}: an image_url part must be {{'type': 'image_url', 'image_url': "
            f"{{'url': ...}}}}, got {value!r:.80}",
            "bad_image",
        )
    return url


def open_image(source: ImageSource) -> Any:
    """The decoded PIL image (pixels read now, so a truncated file fails here); BadExample
    (reason bad_image, or image_url_offline) naming the image otherwise."""
    import PIL.Image

    where = f"image {source.index} ({source.label()})"
    value = source.value
    if isinstance(value, PIL.Image.Image):
        return value
    if isinstance(value, str) and value.startswith(_REMOTE):
        raise BadExample(
            f"{where} is a web URL; sft_jax reads data offline. Download the image and give "
            "its path (relative to the data file) or a data: URI",
            "image_url_offline",
        )
    try:
        with PIL.Image.open(_file(source, where)) as image:
            image.load()
            return image.copy()
    except BadExample:
        raise
    except FileNotFoundError:
        raise BadExample(f"{where}: no such file {source.local_path()}", "bad_image") from None
    except (OSError, ValueError, SyntaxError, PIL.Image.DecompressionBombError) as e:
        raise BadExample(
            f"{where} cannot be decoded ({type(e).__name__}: {str(e)[:120]})", "bad_image"
        ) from None


def _file(source: ImageSource, where: str) -> Any:
    """A path or a file object of the image's encoded bytes."""
    value = source.value
    if isinstance(value, dict) and value.get("bytes"):
        return io.BytesIO(value["bytes"])
    if isinstance(value, str) and value.startswith("data:"):
        header, _, data = value.partition(",")
        try:
            raw = base64.b64decode(data, validate=True) if ";base64" in header else data.encode()
        except binascii.Error as e:
            raise BadExample(f"{where}: a data: URI with invalid base64 ({e})", "bad_image") from e
        return io.BytesIO(raw)
    path = source.local_path()
    if path is None:
        raise BadExample(f"{where}: no image given (got {value!r:.60})", "bad_image")
    return path


def sources_fingerprint(sources: list[ImageSource]) -> str:
    """Changes when a local image file changes (its path, size and modification time, read
    with stat: the files are not opened); bytes and data: URIs are in the data file itself."""
    digest = hashlib.sha256()
    for source in sources:
        path = source.local_path()
        if path is None:
            continue
        try:
            stat = os.stat(path)
            digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(f"{path}\0missing\n".encode())
    return digest.hexdigest()
