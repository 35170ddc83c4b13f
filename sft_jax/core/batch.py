"""The batch schema: every array a train or eval batch may hold, its dtype, what one value
stands for (a token, a segment or a row) and so how it is laid out and sharded.

  TOKEN    [rows, T]  one value per position of the row; sharded over the batch axes and,
                      with a context axis, the time axis (reordered with the tokens)
  SEGMENT  [rows, T]  one value per document of the row: segment s's value at index s - 1
                      (a row of T tokens holds at most T segments); the rest 0. Sharded over
                      the batch axes only: its second axis is not time
  ROW      [rows]     one value per row; sharded over the batch axes
  IMAGE    [rows, *per_row]  a row's images (or their patches) and what describes them, in
                      the row's order; slots past the row's last image are zero. Its per-row
                      shape is fixed for a run by the model's image size and the images a
                      row may hold (`per_row`); sharded over the batch axes only

The data layer fills the arrays by name without knowing which objective reads them; an
objective names the keys it reads beyond BASE_KEYS (its `batch_keys`), and the compiled steps
take exactly those. A new kind of input (images beside the tokens, an advantage per sequence)
is one `register` call.
"""

from __future__ import annotations

import dataclasses

import numpy as np

TOKEN, SEGMENT, ROW, IMAGE = "token", "segment", "row", "image"


@dataclasses.dataclass(frozen=True)
class Field:
    dtype: type
    kind: str  # TOKEN, SEGMENT or ROW
    meaning: str


FIELDS: dict[str, Field] = {}


def register(name: str, field: Field) -> str:
    if name in FIELDS:
        raise ValueError(f"batch field {name!r} is registered twice")
    if field.kind not in (TOKEN, SEGMENT, ROW, IMAGE):
        raise ValueError(f"batch field {name!r}: kind {field.kind!r} is not one of the kinds")
    FIELDS[name] = field
    return name


def shape(
    name: str, rows: int, seq_len: int, per_row: dict[str, tuple[int, ...]] | None = None
) -> tuple[int, ...]:
    """The shape of field `name` in a batch of rows x seq_len tokens; per_row: each IMAGE
    field's shape per row."""
    kind = FIELDS[name].kind
    if kind == IMAGE:
        if not per_row or name not in per_row:
            raise ValueError(f"batch field {name!r} holds images: its per-row shape is needed")
        return (rows, *per_row[name])
    return (rows,) if kind == ROW else (rows, seq_len)


# What every batch holds (data/batches.py documents the label shift).
BASE_KEYS = (
    register("input_ids", Field(np.int32, TOKEN, "token ids")),
    register("target_ids", Field(np.int32, TOKEN, "the token each position predicts")),
    register("target_mask", Field(np.bool_, TOKEN, "whether that prediction trains")),
    register("positions", Field(np.int32, TOKEN, "position in its document, from 0")),
    register("segment_ids", Field(np.int32, TOKEN, "document number in the row, 1.. (0: pad)")),
)
# What some objectives read.
MARGIN_KEY = register(
    "pair_margins",
    Field(np.float32, SEGMENT, "a preference pair's margin, at its chosen sequence's segment"),
)
REFERENCE_KEY = register(
    "reference_logps",
    Field(np.float32, TOKEN, "a reference model's log p(target_ids[t]); 0 off target_mask"),
)
# Qwen2.5-VL's images (models/qwen_vl_rows.py computes them per row on the host).
QWEN_VL_KEYS = (
    register("vision_patches", Field(np.float32, IMAGE, "the row's images' flattened patches")),
    register("vision_patch_positions", Field(np.int32, IMAGE, "a patch's (row, column)")),
    register("vision_window_ids", Field(np.int32, IMAGE, "a patch's window, 1.. (0: none)")),
    register("vision_window_order", Field(np.int32, IMAGE, "the patches window by window")),
    register("vision_image_ids", Field(np.int32, IMAGE, "a patch's image frame, 1.. (0: none)")),
    register("vision_grids", Field(np.int32, IMAGE, "an image's (t, h, w) patch grid")),
    register("mrope_temporal", Field(np.int32, TOKEN, "M-RoPE temporal position")),
    register("mrope_height", Field(np.int32, TOKEN, "M-RoPE height position")),
    register("mrope_width", Field(np.int32, TOKEN, "M-RoPE width position")),
)
# Image-text models' images (models/gemma3_images.py lays out a row's).
PIXEL_VALUES_KEY = register(
    "pixel_values",
    Field(np.float32, IMAGE, "Gemma 3: the row's images [max_images, C, S, S] in row order"),
)
