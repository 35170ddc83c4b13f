"""Gemma 3 image-text checkpoints (Gemma3ForConditionalGeneration): the tensor names of the
vision tower and projector, and the checkpoint layouts read and written.

Checkpoints spell the same tensors two ways, both read here:
  hub (and transformers' save_pretrained)   language_model.model.*, language_model.lm_head.*,
                                            vision_tower.vision_model.*, multi_modal_projector.*
  transformers' in-memory names             model.language_model.*, lm_head.*,
                                            model.vision_tower.*, model.multi_modal_projector.*
Both become sft_jax's reading names (model.*, lm_head.weight, vision_tower.*,
multi_modal_projector.*); exports write the hub's layout, which transformers loads as is.
"""

from __future__ import annotations

import re
from typing import Any

from sft_jax.models.gemma3_vision_config import VisionSpec

# Parameter path inside a vision encoder layer -> name inside vision_tower.encoder.layers.N.
_LAYER_MODULES = {
    "norm1": "layer_norm1",
    "norm2": "layer_norm2",
    "q_proj": "self_attn.q_proj",
    "k_proj": "self_attn.k_proj",
    "v_proj": "self_attn.v_proj",
    "out_proj": "self_attn.out_proj",
    "fc1": "mlp.fc1",
    "fc2": "mlp.fc2",
}
# Path below the model's `vision` -> (tensor name, stored transposed).
_FIXED = {
    ("tower", "patch_embed"): ("vision_tower.embeddings.patch_embedding.weight", False),
    ("tower", "patch_bias"): ("vision_tower.embeddings.patch_embedding.bias", False),
    ("tower", "position_embed"): ("vision_tower.embeddings.position_embedding.weight", False),
    ("tower", "post_norm", "scale"): ("vision_tower.post_layernorm.weight", False),
    ("tower", "post_norm", "bias"): ("vision_tower.post_layernorm.bias", False),
    ("soft_norm", "scale"): ("multi_modal_projector.mm_soft_emb_norm.weight", False),
    ("projection", "kernel"): ("multi_modal_projector.mm_input_projection_weight", False),
}
_LEAVES = {"kernel": ("weight", True), "scale": ("weight", False), "bias": ("bias", False)}


def is_gemma3(config: Any) -> bool:
    """Whether a ModelConfig is Gemma 3's image-text model (its names are this module's)."""
    return isinstance(config.vision, VisionSpec)


def vision_tensor_name(path: tuple[Any, ...], config: Any) -> tuple[str, bool] | None:
    """(reading name, stored transposed) of a parameter under Gemma 3's `vision`, else None."""
    if not path or path[0] != "vision" or not is_gemma3(config):
        return None
    rest = tuple(path[1:])
    if rest in _FIXED:
        return _FIXED[rest]
    _, _, index, module, leaf = rest  # ("tower", "layers", N, module, leaf)
    name, transposed = _LEAVES[leaf]
    return f"vision_tower.encoder.layers.{index}.{_LAYER_MODULES[module]}.{name}", transposed


# (pattern, replacement) from either checkpoint spelling to the reading names, in order.
_TO_READING = (
    (r"^model\.(language_model|vision_tower|multi_modal_projector)\.", r"\1."),
    (r"^language_model\.model\.", "model."),
    (r"^language_model\.lm_head\.", "lm_head."),
    (r"^language_model\.", "model."),
    (r"^vision_tower\.vision_model\.", "vision_tower."),
)
_TO_HUB = (
    (r"^model\.", "language_model.model."),
    (r"^lm_head\.", "language_model.lm_head."),
    (r"^vision_tower\.", "vision_tower.vision_model."),
)


def _renamed(name: str, rules: tuple[tuple[str, str], ...]) -> str:
    for pattern, replacement in rules:
        name = re.sub(pattern, replacement, name)
    return name


def checkpoint_tensors(entries: dict[str, Any]) -> dict[str, Any]:
    """An image-text checkpoint's tensors by their reading names (either spelling)."""
    return {_renamed(name, _TO_READING): entry for name, entry in entries.items()}


def hub_name(name: str) -> str:
    """The hub's name of a tensor by its reading name (what an export writes)."""
    return _renamed(name, _TO_HUB)


def peft_targets(projections: tuple[str, ...]) -> str:
    """PEFT's target_modules for adapters on the language model's projections only: a regex
    (PEFT matches it whole), as plain names would also wrap the vision tower's q/k/v_proj."""
    names = "|".join(sorted(projections))
    return rf"model\.language_model\.layers\.\d+\.(self_attn|mlp)\.({names})"
