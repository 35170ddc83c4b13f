"""Qwen2.5-VL's per-row image arrays and multimodal RoPE positions, in NumPy on the host, from
the Hugging Face processor's outputs of the documents packed into one row (the data layer calls
`row_images` when it packs; models/qwen_vision.py reads the arrays under jit, with static
shapes).

A document is the processor's output for one conversation: `input_ids` [n] (each image a run of
grid_t * grid_h * grid_w / merge**2 image tokens), `pixel_values` [patches, C*Tp*p*p] and
`image_grid_thw` [images, 3] (both absent for text alone). Videos are refused.

M-RoPE positions, as transformers' get_rope_index computes them per document: text tokens count
up on all three axes (temporal, height, width); an image's tokens starting at position s take
(s + t, s + row, s + column) over its merged grid, and the text after it continues at
s + max(merged rows, merged columns). Each packed document starts again at 0. E.g. text a b,
an image of 4 x 4 patches (2 x 2 merged tokens I), text c:

  tokens    a b I I I I c
  temporal  0 1 2 2 2 2 4
  height    0 1 2 2 3 3 4
  width     0 1 2 3 2 3 4
"""

from __future__ import annotations

import dataclasses

import numpy as np

from sft_jax.core.errors import UserError
from sft_jax.models.qwen_vl_config import VisionSpec

# Batch fields (core/batch.py registers them): IMAGE kind, [rows, *per_row] ...
PATCHES = "vision_patches"  # [P, patch_dim] float32: the rows' images' flattened patches
POSITIONS = "vision_patch_positions"  # [P, 2] int32: each patch's (row, column) in its image
WINDOW_IDS = "vision_window_ids"  # [P] int32: each patch's window, 1.. (0: padding)
WINDOW_ORDER = "vision_window_order"  # [P] int32: the patches window by window (padding last)
IMAGE_IDS = "vision_image_ids"  # [P] int32: each patch's image (its frame), 1.. (0: padding)
GRIDS = "vision_grids"  # [I, 3] int32: each image's (t, h, w) patch grid (0: no image)
# ... and TOKEN kind, [rows, T]: the M-RoPE positions of each token.
MROPE = ("mrope_temporal", "mrope_height", "mrope_width")
IMAGE_FIELDS = (PATCHES, POSITIONS, WINDOW_IDS, WINDOW_ORDER, IMAGE_IDS, GRIDS)


class ImageLayoutError(UserError):
    """A row's images do not fit its budget, or a document's image tokens do not match its
    images."""


@dataclasses.dataclass(frozen=True)
class RowBudget:
    """The fixed per-row shapes of a run: tokens, patches and images per row."""

    seq_len: int
    max_patches: int
    max_images: int

    def per_row(self, spec: VisionSpec) -> dict[str, tuple[int, ...]]:
        """Each IMAGE field's per-row shape (core.batch.shape's per_row)."""
        return {
            PATCHES: (self.max_patches, spec.patch_dim),
            POSITIONS: (self.max_patches, 2),
            WINDOW_IDS: (self.max_patches,),
            WINDOW_ORDER: (self.max_patches,),
            IMAGE_IDS: (self.max_patches,),
            GRIDS: (self.max_images, 3),
        }


def patch_positions(grid_thw: np.ndarray, merge: int) -> np.ndarray:
    """[t*h*w, 2] (row, column) of each patch in the processor's order: frame by frame, merge x
    merge blocks row by row, the patches of a block row by row."""
    t, h, w = (int(n) for n in grid_thw)
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    blocks = (h // merge, merge, w // merge, merge)
    rows = rows.reshape(blocks).transpose(0, 2, 1, 3).reshape(-1)
    cols = cols.reshape(blocks).transpose(0, 2, 1, 3).reshape(-1)
    return np.tile(np.stack([rows, cols], axis=-1), (t, 1)).astype(np.int32)


def window_numbers(grid_thw: np.ndarray, spec: VisionSpec) -> np.ndarray:
    """[t*h*w] window of each patch, numbered from 0 within the image (frame by frame, windows
    row by row): windows of window_units x window_units merged tokens from the top left, the
    last row and column of windows cut by the image's edge."""
    t, h, w = (int(n) for n in grid_thw)
    merge, size = spec.spatial_merge_size, spec.window_units
    unit_rows, unit_cols = h // merge, w // merge
    across = -(-unit_cols // size)
    per_frame = -(-unit_rows // size) * across
    frame, unit_row, unit_col = np.meshgrid(
        np.arange(t), np.arange(unit_rows), np.arange(unit_cols), indexing="ij"
    )
    window = frame * per_frame + (unit_row // size) * across + unit_col // size
    return np.repeat(window.reshape(-1), spec.merge_unit).astype(np.int32)


def mrope_positions(input_ids: np.ndarray, grids: np.ndarray, spec: VisionSpec) -> np.ndarray:
    """[3, n] M-RoPE positions of one document (see the module docstring)."""
    is_image = np.asarray(input_ids) == spec.image_token_id
    positions = np.zeros((3, len(is_image)), np.int64)
    start, current, image = 0, 0, 0
    while start < len(is_image):
        end = start + 1
        while end < len(is_image) and is_image[end] == is_image[start]:
            end += 1
        if not is_image[start]:
            positions[:, start:end] = current + np.arange(end - start)
            current += end - start
        else:
            t, h, w = (int(n) for n in grids[image]) if image < len(grids) else (0, 0, 0)
            h, w = h // spec.spatial_merge_size, w // spec.spatial_merge_size
            if end - start != t * h * w:
                raise _mismatch(end - start, image, len(grids), spec)
            grid = np.stack(np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij"))
            positions[:, start:end] = grid.reshape(3, -1) + current
            current += max(h, w)
            image += 1
        start = end
    if image != len(grids):
        raise _mismatch(0, image, len(grids), spec)
    return positions.astype(np.int32)


def _mismatch(run: int, image: int, images: int, spec: VisionSpec) -> ImageLayoutError:
    return ImageLayoutError(
        f"a run of {run} image tokens (id {spec.image_token_id}) does not match image {image} "
        f"of the document's {images} (image_grid_thw); tokenize with the model's processor, "
        "and keep images whole."
    )


def _document_images(document: dict[str, np.ndarray], spec: VisionSpec) -> tuple[np.ndarray, ...]:
    """(patches, grids) of one document, checked; none for text alone."""
    videos = sorted(k for k in ("pixel_values_videos", "video_grid_thw") if k in document)
    if videos:
        raise ImageLayoutError(
            f"Qwen2.5-VL documents with videos ({', '.join(videos)}) are not supported yet; "
            "use images."
        )
    grids = np.asarray(document.get("image_grid_thw", np.zeros((0, 3))), np.int64).reshape(-1, 3)
    patches = document.get("pixel_values", np.zeros((0, spec.patch_dim), np.float32))
    patches = np.asarray(patches, np.float32)
    if patches.shape != (int(grids.prod(axis=1).sum()), spec.patch_dim):
        raise ImageLayoutError(
            f"pixel_values has shape {patches.shape}, but image_grid_thw {grids.tolist()} and "
            f"the model's patches of {spec.patch_dim} values imply "
            f"{(int(grids.prod(axis=1).sum()), spec.patch_dim)}."
        )
    return patches, grids


def row_images(
    documents: list[dict[str, np.ndarray]], budget: RowBudget, spec: VisionSpec
) -> dict[str, np.ndarray]:
    """One row's IMAGE fields (per-row shapes, RowBudget.per_row) and M-RoPE TOKEN fields
    [seq_len] of the documents packed into it in order (each from token 0 of its document, the
    row's tokens the documents' input_ids one after the other, then padding: zeros)."""
    parts = [_document_images(d, spec) for d in documents]
    patches = np.concatenate([p for p, _ in parts] or [np.zeros((0, spec.patch_dim))])
    grids = np.concatenate([g for _, g in parts] or [np.zeros((0, 3), np.int64)])
    tokens = sum(len(d["input_ids"]) for d in documents)
    for what, used, room in (
        ("tokens", tokens, budget.seq_len),
        ("patches", len(patches), budget.max_patches),
        ("images", len(grids), budget.max_images),
    ):
        if used > room:
            raise ImageLayoutError(
                f"the row's documents hold {used} {what}, over the {room} a row has."
            )
    out = {name: np.zeros(shape, np.int32) for name, shape in budget.per_row(spec).items()}
    out[PATCHES] = np.zeros(budget.per_row(spec)[PATCHES], np.float32)
    out[PATCHES][: len(patches)] = patches
    out[GRIDS][: len(grids)] = grids
    start, windows, frames = 0, 0, 0
    for grid in grids:
        count = int(np.prod(grid))
        rows = slice(start, start + count)
        out[POSITIONS][rows] = patch_positions(grid, spec.spatial_merge_size)
        numbers = window_numbers(grid, spec)
        out[WINDOW_IDS][rows] = windows + 1 + numbers
        out[IMAGE_IDS][rows] = frames + 1 + np.repeat(np.arange(grid[0]), count // grid[0])
        windows, frames = windows + int(numbers.max()) + 1, frames + int(grid[0])
        start += count
    # transformers' window order: window by window, each window's patches in their order.
    last = np.where(out[WINDOW_IDS] == 0, windows + 1, out[WINDOW_IDS])
    out[WINDOW_ORDER] = np.argsort(last, kind="stable").astype(np.int32)
    mrope = np.zeros((3, budget.seq_len), np.int32)
    offset = 0
    for document, (_, grids_of) in zip(documents, parts, strict=True):
        ids = np.asarray(document["input_ids"]).reshape(-1)
        mrope[:, offset : offset + len(ids)] = mrope_positions(ids, grids_of, spec)
        offset += len(ids)
    return {**out, **dict(zip(MROPE, mrope, strict=True))}
