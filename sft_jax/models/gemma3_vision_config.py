"""Gemma 3's image-text checkpoints (config.json model_type "gemma3",
Gemma3ForConditionalGeneration): their family, and config.json's vision_config and image
fields read into a `VisionSpec` (the text model is read as gemma3_text).

What sft_jax implements (models/gemma3_vision.py, models/siglip.py): the SigLIP vision tower
without its pooling head, the average pool of each image's patches to mm_tokens_per_image soft
tokens, the projector (an RMSNorm scaling by 1 + w, then a projection to the text width), the
soft tokens placed at the image-token positions, and image tokens attending bidirectionally
within their image. Anything else config.json asks for is refused by name.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from sft_jax.models.families import Family, UnsupportedModelError, register


@dataclasses.dataclass(frozen=True)
class VisionSpec:
    """The SigLIP tower (vision_config) and how its output enters the text model."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_channels: int
    image_size: int  # square images of image_size pixels a side
    patch_size: int
    layer_norm_eps: float
    tokens_per_image: int  # mm_tokens_per_image: soft tokens per image after the pool
    image_token_id: int  # image_token_index: the placeholder each soft token replaces

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def pool(self) -> int:
        """Side of the average pool's window (and stride) over the patch grid."""
        return self.patches_per_side // math.isqrt(self.tokens_per_image)


# vision_config fields whose value sft_jax implements (and only that value).
_VISION_VALUES = {
    "hidden_act": "gelu_pytorch_tanh",
    "vision_use_head": False,
    "attention_dropout": 0.0,
}


def _refuse(field: str, value: Any, why: str) -> None:
    raise UnsupportedModelError(f"gemma3: config.json {field}={value!r}: {why}")


def vision_spec(hf: Any) -> VisionSpec:
    """The VisionSpec of a transformers Gemma3Config, or UnsupportedModelError naming the
    config.json field sft_jax does not implement."""
    vision = hf.vision_config
    for field, supported in _VISION_VALUES.items():
        value = getattr(vision, field, supported)
        if value != supported:
            _refuse(f"vision_config.{field}", value, f"sft_jax implements {supported!r} only.")
    text = hf.get_text_config()
    if getattr(text, "use_bidirectional_attention", False):
        _refuse(
            "text_config.use_bidirectional_attention", True, "sft_jax trains causal LMs (false)."
        )
    if getattr(text, "final_logit_softcapping", None) is not None:
        _refuse(
            "text_config.final_logit_softcapping",
            text.final_logit_softcapping,
            "transformers' Gemma3ForConditionalGeneration never applies it, the text model would "
            "(ambiguous); set it to null.",
        )
    spec = VisionSpec(
        hidden_size=int(vision.hidden_size),
        intermediate_size=int(vision.intermediate_size),
        num_layers=int(vision.num_hidden_layers),
        num_heads=int(vision.num_attention_heads),
        num_channels=int(vision.num_channels),
        image_size=int(vision.image_size),
        patch_size=int(vision.patch_size),
        layer_norm_eps=float(vision.layer_norm_eps),
        tokens_per_image=int(hf.mm_tokens_per_image),
        image_token_id=int(hf.image_token_id),
    )
    side = math.isqrt(spec.tokens_per_image)
    if side * side != spec.tokens_per_image or spec.patches_per_side % side:
        _refuse(
            "mm_tokens_per_image",
            spec.tokens_per_image,
            f"expected a square whose side divides the {spec.patches_per_side} patches a side "
            "(image_size / patch_size).",
        )
    if spec.image_size % spec.patch_size or spec.hidden_size % spec.num_heads:
        _refuse(
            "vision_config",
            (spec.image_size, spec.patch_size, spec.hidden_size, spec.num_heads),
            "image_size must be a multiple of patch_size, hidden_size of num_attention_heads.",
        )
    return spec


def gemma3_fields(hf: Any) -> dict[str, Any]:
    """What the image-text checkpoint adds to its text model's config: the image tower, and
    the whole config.json for export."""
    return {"vision": vision_spec(hf), "hf_config": hf.to_dict()}


FAMILY = register(Family("gemma3", text_config=True, hf_fields=gemma3_fields))
