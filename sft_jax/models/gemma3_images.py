"""Gemma 3's image arrays of one packed row, from the Hugging Face processor's outputs of the
row's documents (pure NumPy: the data layer calls it when packing).

A document's images are its processor output's `pixel_values` [n, C, S, S], one per run of
mm_tokens_per_image image tokens in its `input_ids`, in order (with do_pan_and_scan=True each
image's crops follow it, each crop with a run of its own: nothing else differs). A row holds
its documents' images in the row's order, then zeros up to `max_images` slots:

  documents  [ids: .. <img>x4 .. <img>x4 ..  pixels: [A, B]],  [ids: ..text..],
             [ids: .. <img>x4 ..  pixels: [C]]
  row        pixel_values [max_images, C, S, S] = [A, B, C, 0, ...]

The model then gives the row's k-th image-token run the row's k-th image
(models/gemma3_vision.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sft_jax.core.errors import UserError
from sft_jax.models.gemma3_vision_config import VisionSpec

PIXEL_VALUES = "pixel_values"


def per_row_shapes(spec: VisionSpec, max_images: int) -> dict[str, tuple[int, ...]]:
    """The per-row shape of each image field (core.batch.shape's per_row)."""
    return {PIXEL_VALUES: (max_images, spec.num_channels, spec.image_size, spec.image_size)}


def image_runs(input_ids: np.ndarray, image_token_id: int) -> list[int]:
    """The lengths of the runs of image tokens in a document's ids, in order."""
    is_image = np.concatenate(
        [[False], np.asarray(input_ids).reshape(-1) == image_token_id, [False]]
    )
    edges = np.flatnonzero(np.diff(is_image.astype(np.int8)))
    return (edges[1::2] - edges[0::2]).tolist()


def _document_images(document: dict[str, Any], index: int, spec: VisionSpec) -> np.ndarray:
    """A document's images [n, C, S, S] float32, checked against its image-token runs."""
    shape = (spec.num_channels, spec.image_size, spec.image_size)
    pixels = np.asarray(document.get(PIXEL_VALUES, np.zeros((0, *shape))), np.float32)
    if pixels.shape[1:] != shape:
        raise UserError(
            f"document {index}: pixel_values of shape {pixels.shape[1:]} per image; the model "
            f"takes {shape} (vision_config num_channels, image_size)."
        )
    runs = image_runs(document["input_ids"], spec.image_token_id)
    if len(runs) != len(pixels) or any(run != spec.tokens_per_image for run in runs):
        raise UserError(
            f"document {index}: {len(pixels)} images but image-token runs of lengths {runs} "
            f"(token {spec.image_token_id}); each image needs one run of mm_tokens_per_image="
            f"{spec.tokens_per_image} tokens (a truncated document cuts a run: keep images whole)."
        )
    return pixels


def row_images(
    documents: list[dict[str, Any]], max_images: int, spec: VisionSpec
) -> dict[str, np.ndarray]:
    """The row's image fields ({"pixel_values": [max_images, C, S, S]}) from the processor
    outputs of its documents in row order (each with `input_ids`, and `pixel_values` where
    it has images)."""
    shape = per_row_shapes(spec, max_images)[PIXEL_VALUES]
    images = [_document_images(document, i, spec) for i, document in enumerate(documents)]
    stacked = np.concatenate(images) if images else np.zeros((0, *shape[1:]))  # a padding row
    if len(stacked) > max_images:
        raise UserError(
            f"a row holds {len(stacked)} images, more than its {max_images} image slots; "
            "raise the images per row or pack fewer image documents per row."
        )
    pixel_values = np.zeros(shape, np.float32)
    pixel_values[: len(stacked)] = stacked
    return {PIXEL_VALUES: pixel_values}
