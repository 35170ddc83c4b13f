"""The vision part of an image-text model, whichever family: built from ModelConfig.vision, and
the one call the decoder makes to put a batch's images into the token embeddings.

Every family's vision module has `place(input_ids, segment_ids, positions, x, images)` ->
(embeddings with the images' tokens at the image-token positions, the positions the language
model rotates by, image groups for the attention mask or None):
  Gemma 3     (models/gemma3_vision.py): SigLIP soft tokens; image tokens attend within their
              image both ways, so it returns the image groups
  Qwen2.5-VL  (models/qwen_vision.py): the ViT's merged patches; M-RoPE positions [B, T, 3]
"""

from __future__ import annotations

from typing import Any

import jax

from sft_jax.models import gemma3_vision_config
from sft_jax.models.gemma3_vision import Gemma3Vision
from sft_jax.models.qwen_vision import QwenVision


def vision_part(config: Any, *, dtype, param_dtype, rngs) -> Gemma3Vision | QwenVision | None:
    """The vision part of a ModelConfig that has one, else None."""
    spec = config.vision
    if spec is None:
        return None
    if isinstance(spec, gemma3_vision_config.VisionSpec):
        return Gemma3Vision(
            spec, config.hidden_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
    return QwenVision(spec, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def place_images(
    vision: Gemma3Vision | QwenVision | None,
    input_ids_BxT: jax.Array,
    segment_ids_BxT: jax.Array,
    positions_BxT: jax.Array,
    x_BxTxD: jax.Array,
    images: dict[str, jax.Array] | None,
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """(embeddings, positions, image groups or None) with the batch's images in place; a text
    model's inputs unchanged, or a clear error where it is given images."""
    if vision is None:
        if images:
            raise ValueError("images= was given to a text model (its config has no vision part).")
        return x_BxTxD, positions_BxT, None
    return vision.place(input_ids_BxT, segment_ids_BxT, positions_BxT, x_BxTxD, images)
