"""Qwen2.5-VL (`qwen2_5_vl`): its config.json's vision_config and image fields as a
VisionSpec, and what sft_jax refuses of it (videos are not implemented).

The language model is Qwen2's decoder with multimodal RoPE (rope_parameters.mrope_section,
models/mrope.py); its config is config.json's text_config (or, in the hub's older files, the
top-level fields). Imports nothing heavy: the data layer reads a VisionSpec too
(models/qwen_vl_rows.py).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from sft_jax.models.families import Family, UnsupportedModelError, register
from sft_jax.models.rope import rope_table

_ACTIVATIONS = ("silu", "gelu_pytorch_tanh")
_DEFAULT_SECTION = (16, 24, 24)  # transformers' Qwen2_5_VLRotaryEmbedding default


@dataclasses.dataclass(frozen=True)
class VisionSpec:
    """The vision transformer (transformers' Qwen2_5_VisionTransformerPretrainedModel) and the
    tokens that stand for its outputs in the text."""

    depth: int  # vision blocks
    hidden_size: int  # width of the vision blocks
    intermediate_size: int  # width of their gated MLP
    num_heads: int
    in_channels: int
    patch_size: int  # pixels per patch side
    temporal_patch_size: int  # frames per patch (an image is repeated this many times)
    spatial_merge_size: int  # the merger joins merge x merge neighbouring patches into a token
    window_size: int  # pixels per window side in the windowed blocks
    out_hidden_size: int  # width of the merged tokens (the language model's hidden_size)
    fullatt_block_indexes: tuple[int, ...]  # blocks that attend over the whole image
    rope_theta: float  # base of the 2-D rotary embedding over (row, column)
    activation: str  # of the blocks' gated MLP
    image_token_id: int  # the placeholder token each merged image token replaces

    @property
    def patch_dim(self) -> int:
        """Values per flattened patch: channels x frames x patch rows x patch columns."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def merge_unit(self) -> int:
        """Patches per merged token."""
        return self.spatial_merge_size**2

    @property
    def window_units(self) -> int:
        """Merged tokens per window side (transformers' vit_merger_window_size)."""
        return self.window_size // self.spatial_merge_size // self.patch_size


def _get(config: Any, name: str, default: Any = None) -> Any:
    if isinstance(config, dict):
        return config.get(name, default)
    return getattr(config, name, default)


def vision_spec(hf: Any) -> VisionSpec:
    """config.json's vision_config as a VisionSpec, or UnsupportedModelError naming the field."""
    v = hf.vision_config
    rope = _get(v, "rope_parameters") or {"rope_type": "axial", "rope_theta": 10000.0}
    if rope.get("rope_type", "axial") != "axial":
        raise UnsupportedModelError(
            f"qwen2_5_vl: config.json vision_config.rope_parameters rope_type "
            f"{rope.get('rope_type')!r} is not supported (only the axial 2-D RoPE)."
        )
    activation = _get(v, "hidden_act", "silu")
    if activation not in _ACTIVATIONS:
        raise UnsupportedModelError(
            f"qwen2_5_vl: config.json vision_config.hidden_act {activation!r} is not supported "
            f"(supported: {', '.join(_ACTIVATIONS)})."
        )
    spec = VisionSpec(
        depth=int(_get(v, "depth")),
        hidden_size=int(_get(v, "hidden_size")),
        intermediate_size=int(_get(v, "intermediate_size")),
        num_heads=int(_get(v, "num_heads")),
        in_channels=int(_get(v, "in_channels", 3)),
        patch_size=int(_get(v, "patch_size")),
        temporal_patch_size=int(_get(v, "temporal_patch_size")),
        spatial_merge_size=int(_get(v, "spatial_merge_size")),
        window_size=int(_get(v, "window_size")),
        out_hidden_size=int(_get(v, "out_hidden_size")),
        fullatt_block_indexes=tuple(int(i) for i in _get(v, "fullatt_block_indexes", ())),
        rope_theta=float(rope.get("rope_theta", 10000.0)),
        activation=activation,
        image_token_id=int(hf.image_token_id),
    )
    _check(spec, hf)
    return spec


def _check(spec: VisionSpec, hf: Any) -> None:
    """Refuses, by name, what the vision part or the language model would compute wrongly."""
    text = hf.get_text_config()
    if spec.out_hidden_size != text.hidden_size:
        raise UnsupportedModelError(
            f"qwen2_5_vl: config.json vision_config.out_hidden_size={spec.out_hidden_size} "
            f"differs from the language model's hidden_size={text.hidden_size}."
        )
    if spec.window_units < 1:
        raise UnsupportedModelError(
            f"qwen2_5_vl: config.json vision_config.window_size={spec.window_size} is smaller "
            "than one merged token (spatial_merge_size * patch_size pixels)."
        )
    if spec.head_dim % 4:
        raise UnsupportedModelError(
            f"qwen2_5_vl: vision head dim {spec.head_dim} (hidden_size / num_heads) must be a "
            "multiple of 4 for the 2-D RoPE."
        )
    if getattr(text, "use_sliding_window", False):
        raise UnsupportedModelError(
            "qwen2_5_vl: config.json use_sliding_window=true is not supported with multimodal "
            "RoPE; set it to false."
        )
    rope = dict(text.rope_parameters or {})
    if rope.get("rope_type", "default") not in ("default", "mrope"):
        raise UnsupportedModelError(
            f"qwen2_5_vl: config.json rope_scaling rope_type {rope.get('rope_type')!r} with "
            "mrope_section is not supported (only the default frequencies)."
        )


def qwen2_5_vl_fields(hf: Any) -> dict[str, Any]:
    """The ModelConfig fields the multimodal checkpoint adds to its text model's: the vision
    part, the M-RoPE sections of its RoPE (transformers' default where config.json has none)
    and the whole config.json for export."""
    text = hf.get_text_config()
    section = tuple((text.rope_parameters or {}).get("mrope_section") or _DEFAULT_SECTION)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    if 2 * sum(section) != head_dim or len(section) != 3:
        raise UnsupportedModelError(
            f"qwen2_5_vl: config.json rope_scaling mrope_section={list(section)} must be three "
            f"numbers summing to half the head dim ({head_dim // 2})."
        )
    layer_types = tuple(text.layer_types)
    rope = tuple(
        (kind, dataclasses.replace(spec, mrope_section=section))
        for kind, spec in rope_table(text, layer_types)
    )
    return {
        "vision": vision_spec(hf),
        "rope": rope,
        # transformers ties the LM head by the top-level field (the text config may lack it).
        "tie_word_embeddings": bool(getattr(hf, "tie_word_embeddings", False)),
        "hf_config": hf.to_dict(),
    }


register(Family("qwen2_5_vl_text", qkv_bias=True))
FAMILY = register(Family("qwen2_5_vl", text_config=True, hf_fields=qwen2_5_vl_fields))
