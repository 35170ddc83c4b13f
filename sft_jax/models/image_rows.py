"""Which image arrays a row of an image-text model holds, family by family: the data layer packs
documents with images through `layout_of(config, budget)` without knowing the family.

A family's layout gives the per-row shapes of its IMAGE batch fields (core/batch.py), the TOKEN
fields it adds (Qwen2.5-VL's M-RoPE positions), how much of the row's image budget a document
takes, and the row function (in NumPy, on the host) from the processor's outputs of the
documents of one row, in order, to that row's arrays. A family is one entry of LAYOUTS, keyed by
the class of its ModelConfig.vision (Qwen2.5-VL, Gemma 3).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from sft_jax.models import gemma3_images, gemma3_vision_config, qwen_vl_rows
from sft_jax.models.qwen_vl_config import VisionSpec


@dataclasses.dataclass(frozen=True)
class ImageBudget:
    """What one row may hold: tokens, images, and image patches (the vision tower's inputs)."""

    seq_len: int
    max_images: int
    max_patches: int


@dataclasses.dataclass(frozen=True)
class ImageLayout:
    """A family's image arrays for rows of one budget."""

    per_row: dict[str, tuple[int, ...]]  # each IMAGE field's shape per row
    token_fields: tuple[str, ...]  # TOKEN fields the row function fills ([seq_len] each)
    # Documents' (images, patches), each [documents], from the lengths on axis 0 of their
    # processor arrays by name, each [documents] (a name absent: no document has it).
    cost: Callable[[dict[str, np.ndarray]], tuple[np.ndarray, np.ndarray]]
    # The processor's outputs of a row's documents (input_ids and arrays) -> its fields.
    row: Callable[[list[dict[str, np.ndarray]]], dict[str, np.ndarray]]

    @property
    def fields(self) -> tuple[str, ...]:
        """Every batch field of the layout: what the model reads as `images=`."""
        return (*self.per_row, *self.token_fields)


def _qwen_vl(config, budget: ImageBudget) -> ImageLayout:
    spec = config.vision
    rows = qwen_vl_rows.RowBudget(budget.seq_len, budget.max_patches, budget.max_images)

    def cost(lengths: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        none = np.zeros(len(next(iter(lengths.values()), [])), np.int64)
        return lengths.get("image_grid_thw", none), lengths.get("pixel_values", none)

    return ImageLayout(
        per_row=rows.per_row(spec),
        token_fields=qwen_vl_rows.MROPE,
        cost=cost,
        row=lambda documents: qwen_vl_rows.row_images(documents, rows, spec),
    )


def _gemma3(config, budget: ImageBudget) -> ImageLayout:
    """Gemma 3: fixed-size images (pan-and-scan crops are images too), counted against the
    row's images only; the image groups come from the ids, so no TOKEN fields."""
    spec = config.vision

    def cost(lengths: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        none = np.zeros(len(next(iter(lengths.values()), [])), np.int64)
        return lengths.get(gemma3_images.PIXEL_VALUES, none), none

    return ImageLayout(
        per_row=gemma3_images.per_row_shapes(spec, budget.max_images),
        token_fields=(),
        cost=cost,
        row=lambda documents: gemma3_images.row_images(documents, budget.max_images, spec),
    )


# The class of a ModelConfig's vision part -> the family's layout for that config and a budget.
LAYOUTS: dict[type, Callable[..., ImageLayout]] = {
    VisionSpec: _qwen_vl,
    gemma3_vision_config.VisionSpec: _gemma3,
}


def layout_of(config, budget: ImageBudget) -> ImageLayout | None:
    """The image layout of `config` (a ModelConfig), or None for a text model."""
    if getattr(config, "vision", None) is None:
        return None
    if type(config.vision) not in LAYOUTS:
        raise qwen_vl_rows.ImageLayoutError(
            f"{config.model_type}: training on images is not supported for this family yet."
        )
    return LAYOUTS[type(config.vision)](config, budget)
