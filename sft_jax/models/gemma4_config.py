"""Gemma 4 (text, config.json model_type "gemma4_text"): its family and what its config.json
says per layer, read into ModelConfig's fields.

What sets it apart from Gemma 3 (transformers' modeling_gemma4, text parts):
- RMSNorms scale by w, not 1 + w; values get an RMSNorm without scale (v_norm); q.k is not
  scaled (scaling 1.0: the q/k norms set the scale); no attention soft-capping.
- full-attention layers have their own head_dim (global_head_dim) and, with attention_k_eq_v,
  their own kv heads (num_global_key_value_heads) and no v_proj: the values are the k
  projection (before k_norm and RoPE), v-normed. config.per_layer_config holds both.
- "proportional" RoPE on full layers: a partial_rotary_factor share of the head rotates.
- KV sharing: the last num_kv_shared_layers layers have no k/v projections and attend with the
  keys/values of the last earlier layer of their type; with use_double_wide_mlp their MLP is
  twice intermediate_size.
- per-layer input embeddings (PLE, models/per_layer.py) and a stored layer_scalar per layer.
- enable_moe_block: an expert block beside the dense MLP of every layer (models/gemma4_moe.py).
"""

from __future__ import annotations

from typing import Any

from sft_jax.models.families import Family, UnsupportedModelError, register


def _refuse_unsupported(hf: Any) -> None:
    bidirectional = getattr(hf, "use_bidirectional_attention", None)
    if bidirectional is not None:
        raise UnsupportedModelError(
            f"gemma4_text: config.json use_bidirectional_attention={bidirectional!r} (attention "
            "that is not causal) is not supported; sft_jax trains causal LMs (set it to null)."
        )
    shared, layers = int(hf.num_kv_shared_layers or 0), int(hf.num_hidden_layers)
    if shared >= layers:
        raise UnsupportedModelError(
            f"gemma4_text: config.json num_kv_shared_layers={shared} leaves no layer of "
            f"num_hidden_layers={layers} computing keys and values."
        )


def kv_sources(layer_types: list[str], num_shared: int) -> tuple[int, ...]:
    """The layer whose keys/values each layer attends with: its own, or for the last
    `num_shared` layers the last earlier (unshared) layer of the same type."""
    first_shared = len(layer_types) - num_shared
    sources = list(range(len(layer_types)))
    for index in range(first_shared, len(layer_types)):
        same_type = [i for i in range(first_shared) if layer_types[i] == layer_types[index]]
        if not same_type:
            raise UnsupportedModelError(
                f"gemma4_text: config.json layer {index} ({layer_types[index]}) shares keys and "
                "values (num_kv_shared_layers) but no earlier layer of its type computes them."
            )
        sources[index] = same_type[-1]
    return tuple(sources)


def model_fields(hf: Any) -> dict[str, Any]:
    """The ModelConfig fields Gemma 4 reads in its own way, or UnsupportedModelError naming the
    config.json field sft_jax does not follow."""
    _refuse_unsupported(hf)
    layer_types = list(hf.layer_types)
    sources = kv_sources(layer_types, int(hf.num_kv_shared_layers or 0))
    shared = [i for i, source in enumerate(sources) if source != i]
    widen = 2 if getattr(hf, "use_double_wide_mlp", False) else 1
    per_layer = [hf.per_layer_config[i] for i in range(len(layer_types))]
    k_eq_v = bool(getattr(hf, "attention_k_eq_v", False))
    ple_width = int(getattr(hf, "hidden_size_per_layer_input", 0) or 0)
    return {
        "gemma_norms": False,
        "query_scale": 1.0,
        "attn_logit_softcap": None,
        "layer_head_dims": tuple(int(c.head_dim) for c in per_layer),
        "layer_kv_heads": tuple(int(c.num_key_value_heads) for c in per_layer),
        "layer_mlp_widths": tuple(
            hf.intermediate_size * (widen if i in shared else 1) for i in range(len(layer_types))
        ),
        "kv_sources": sources,
        "value_is_key_layers": tuple(
            i
            for i, kind in enumerate(layer_types)
            if k_eq_v and kind != "sliding_attention" and i not in shared
        ),
        "v_norm": True,
        "per_layer_input_size": ple_width,
        "per_layer_vocab_size": int(hf.vocab_size_per_layer_input) if ple_width else 0,
        "layer_scalars": True,
        **_expert_fields(hf),
    }


def _expert_fields(hf: Any) -> dict[str, Any]:
    """The expert block's fields where enable_moe_block is set (else none)."""
    if not getattr(hf, "enable_moe_block", False):
        return {}
    experts, top_k = int(hf.num_experts or 0), int(hf.top_k_experts or 0)
    if not 1 <= top_k <= experts or not hf.moe_intermediate_size:
        raise UnsupportedModelError(
            f"gemma4_text: config.json enable_moe_block=true with num_experts={experts}, "
            f"top_k_experts={top_k}, moe_intermediate_size={hf.moe_intermediate_size}: "
            "expected 1 <= top_k_experts <= num_experts and a moe_intermediate_size."
        )
    return {
        "parallel_experts": True,
        "num_experts": experts,
        "experts_per_token": top_k,
        "moe_intermediate_size": int(hf.moe_intermediate_size),
    }


FAMILY = register(
    Family(
        "gemma4_text", sandwich_norms=True, embed_scale=True, qk_norm=True, hf_fields=model_fields
    )
)
# The image-text(-audio) checkpoints (Gemma4ForConditionalGeneration): their text model.
MULTIMODAL_FAMILY = register(Family("gemma4", text_config=True))
