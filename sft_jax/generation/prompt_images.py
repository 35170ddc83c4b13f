"""The prompts' images as the sampler's batch fields: each prompt one left-padded row.

A prompt's images are the processor's arrays of that prompt (what data/vision.py keeps as a
VisionDocument's `images`: Gemma 3 pixel_values [n, 3, S, S]; Qwen2.5-VL pixel_values
[patches, C*t*p*p] and image_grid_thw [n, 3]), or None / {} for a text prompt. Each row is laid
out by the family's row function (models/image_rows.py) as a row holding that one prompt, then
its TOKEN fields (Qwen2.5-VL's M-RoPE positions) move right with the prompt's left padding:

  prompt        a b I I I I c            (T = 8: one padding slot first)
  row function  temporal [0 1 2 2 2 2 4 0]
  batch field   temporal [0 0 1 2 2 2 2 4]

Images and patches per row are rounded up to powers of two, like the sampler's other shapes,
so that repeated calls reuse one compilation per bucket.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from sft_jax.models.image_rows import ImageBudget, layout_of


def _bucket(n: int) -> int:
    return 1 << (max(n, 1) - 1).bit_length()


def image_fields(
    config: Any,
    prompts: Sequence[Sequence[int]],
    images: Sequence[dict[str, np.ndarray] | None] | None,
    rows: int,
    length: int,
) -> dict[str, np.ndarray] | None:
    """The batch's image fields by name, each [rows, *per_row] ([rows, length] for a TOKEN
    field), for prompts left-padded to `length` (ModelConfig `config`); None without images."""
    if images is None or not any(images):
        return None
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} image entries for {len(prompts)} prompts: give one each.")
    documents = [
        {"input_ids": np.asarray(prompt), **(arrays or {})}
        for prompt, arrays in zip(prompts, images, strict=True)
    ]
    probe = layout_of(config, ImageBudget(length, 1, 1))
    if probe is None:
        raise ValueError(
            f"{config.model_type}: images were given to a text model (its config has no vision "
            "part); use an image-text model."
        )
    names = {name for arrays in images if arrays for name in arrays}
    lengths = {n: np.array([len(d.get(n, ())) for d in documents]) for n in sorted(names)}
    counts, patches = probe.cost(lengths)
    budget = ImageBudget(length, _bucket(int(counts.max())), _bucket(int(patches.max())))
    layout = layout_of(config, budget)
    laid = [layout.row([document]) for document in documents]
    empty = {"input_ids": np.zeros(0, np.int32)}  # a padding row: no tokens, no images
    laid += [layout.row([empty]) for _ in range(rows - len(documents))]
    for row, prompt in zip(laid, prompts, strict=False):
        for name in layout.token_fields:  # aligned with the left-padded tokens
            row[name] = np.roll(row[name], length - len(prompt))
    return {name: np.stack([row[name] for row in laid]) for name in layout.fields}
