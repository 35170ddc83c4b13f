"""Hugging Face tensor names that a table gives: the model-level parameters, and those of
decoder layers only some families have (Gemma 4's per-layer input embeddings and layer
scalars: models/per_layer.py)."""

from __future__ import annotations

from typing import Any

from flax import nnx

from sft_jax.models.per_layer import Buffer

# The variables a checkpoint stores: parameters and (Gemma 4's layer_scalar) buffers.
STORED_VARIABLES = (nnx.Param, Buffer)

# Model-level parameter path -> (tensor name, stored transposed).
_MODEL_NAMES = {
    ("embed",): ("model.embed_tokens.weight", False),
    ("lm_head",): ("lm_head.weight", False),
    ("score",): ("score.weight", False),
    ("final_norm", "scale"): ("model.norm.weight", False),
    ("per_layer_embed", "table"): ("model.embed_tokens_per_layer.weight", False),
    ("per_layer_embed", "projection", "kernel"): ("model.per_layer_model_projection.weight", True),
    ("per_layer_embed", "norm", "scale"): ("model.per_layer_projection_norm.weight", False),
}
# Path inside a decoder layer -> (name inside model.layers.N, stored transposed).
_LAYER_NAMES = {
    ("per_layer_input", "gate", "kernel"): ("per_layer_input_gate.weight", True),
    ("per_layer_input", "projection", "kernel"): ("per_layer_projection.weight", True),
    ("per_layer_input", "norm", "scale"): ("post_per_layer_input_norm.weight", False),
    ("layer_scalar",): ("layer_scalar", False),
    # Gemma 4's expert block (models/gemma4_moe.py), stored in the checkpoint's layout.
    ("experts", "router_proj"): ("router.proj.weight", False),
    ("experts", "router_scale"): ("router.scale", False),
    ("experts", "per_expert_scale"): ("router.per_expert_scale", False),
    ("experts", "gate_up"): ("experts.gate_up_proj", False),
    ("experts", "down"): ("experts.down_proj", False),
    ("experts", "dense_post_norm", "scale"): ("post_feedforward_layernorm_1.weight", False),
    ("experts", "pre_norm", "scale"): ("pre_feedforward_layernorm_2.weight", False),
    ("experts", "post_norm", "scale"): ("post_feedforward_layernorm_2.weight", False),
}


# Where a multimodal checkpoint (Gemma 4's) keeps its text model's tensors.
_TEXT_MODEL_PREFIX = "model.language_model."


def text_model_tensors(entries: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's tensors by the names of its text model as a causal LM: a multimodal
    checkpoint's model.language_model.* as model.* (the other towers left out but Qwen2.5-VL's
    model.visual.*, read as visual.*), the lm_head as is; any other checkpoint's unchanged."""
    if not any(name.startswith(_TEXT_MODEL_PREFIX) for name in entries):
        return entries
    text = {
        (
            f"model.{name.removeprefix(_TEXT_MODEL_PREFIX)}" if name != "lm_head.weight" else name
        ): entry
        for name, entry in entries.items()
        if name.startswith(_TEXT_MODEL_PREFIX) or name == "lm_head.weight"
    }
    # Qwen2.5-VL's vision part, by the hub's names (visual.*: models/io/qwen_vl.py).
    visual = {
        n.removeprefix("model."): e for n, e in entries.items() if n.startswith("model.visual.")
    }
    return {**text, **visual}


def fixed_tensor_name(path: tuple[Any, ...]) -> tuple[str, bool] | None:
    """(tensor name, stored transposed) of such a parameter, or None for any other."""
    if path in _MODEL_NAMES:
        return _MODEL_NAMES[path]
    if len(path) > 2 and path[0] == "layers" and tuple(path[2:]) in _LAYER_NAMES:
        name, transposed = _LAYER_NAMES[tuple(path[2:])]
        return f"model.layers.{path[1]}.{name}", transposed
    return None
