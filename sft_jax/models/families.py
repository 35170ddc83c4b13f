"""Model families by config.json's model_type: what each needs that config.json does not
spell out. A new family registers a `Family` here (and its layers in models/); nothing else
compares model_type names."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from sft_jax.core.errors import UserError
from sft_jax.core.registry import Registry


class UnsupportedModelError(UserError):
    """The checkpoint's architecture (config.json) is one sft_jax does not implement."""


@dataclasses.dataclass(frozen=True)
class Family:
    model_type: str
    qkv_bias: bool = False  # q/k/v projections carry biases whatever attention_bias says
    qk_norm: bool = False  # RMSNorm over each head's queries and keys
    gemma_norms: bool = False  # norms scale by (1 + weight)
    sandwich_norms: bool = False  # norms after attention and MLP too
    # Norms after attention and after the MLP only, inside the residual, none before (OLMo 2/3).
    post_norms: bool = False
    # q/k norms over the whole projection (all heads at once) rather than each head (OLMo 2/3).
    qk_norm_full: bool = False
    # Layers without RoPE (NoPE) as config.json's no_rope_layers lists them (SmolLM3); the
    # window of sliding layers only where use_sliding_window is set.
    no_rope_layers: bool = False
    embed_scale: bool = False  # embeddings times sqrt(hidden_size)
    # Mixture of experts: "" (dense), "mixtral" (every layer sparse, experts as wide as
    # intermediate_size, top-k weights renormalised, Mixtral's w1/w2/w3 names), "gpt_oss"
    # (every layer sparse, gpt-oss's fused gate_up_proj layout and expert block) or "qwen"
    # (sparse layers by decoder_sparse_step and mlp_only_layers, moe_intermediate_size,
    # norm_topk_prob, gate/up/down names, an optional shared expert).
    moe: str = ""
    # A learned logit per query head in every softmax's denominator (gpt-oss's sinks).
    attention_sinks: bool = False
    # ModelConfig fields a family reads from config.json in its own way (Gemma 4; an image-text
    # model's vision part): a function of the transformers config returning them, or None.
    hf_fields: Callable[[Any], dict[str, Any]] | None = None
    # config.json wraps the text model's config (text_config) with other modalities' (Gemma
    # 4's image-text-audio checkpoints): sft_jax reads and loads the text model alone.
    text_config: bool = False
    # DeepSeek-V3: multi-head latent attention (models/mla.py) and its router (sigmoid scores,
    # a frozen score-correction bias, group-limited top-k, scaling, ungated shared experts,
    # dense first layers), read by models/deepseek.py.
    mla: bool = False
    # Hybrid linear attention (Qwen3.5): layer_types' "linear_attention" layers are Gated
    # DeltaNets (models/linear_attention.py); the full-attention layers gate their output by a
    # sigmoid of a second half of q_proj, and RoPE turns part of each head
    # (partial_rotary_factor).
    gated_delta_net: bool = False


FAMILIES: Registry[Family] = Registry("model family")


def register(family: Family) -> Family:
    return FAMILIES.register(family.model_type, family)


register(Family("llama"))
register(Family("mistral"))
register(Family("qwen2", qkv_bias=True))
register(Family("qwen3", qk_norm=True))
register(Family("gemma2", gemma_norms=True, sandwich_norms=True, embed_scale=True))
register(
    Family("gemma3_text", gemma_norms=True, sandwich_norms=True, embed_scale=True, qk_norm=True)
)
register(Family("smollm3", no_rope_layers=True))
register(Family("olmo3", qk_norm=True, qk_norm_full=True, post_norms=True))
register(Family("mixtral", moe="mixtral"))  # models/moe.py
register(Family("qwen2_moe", moe="qwen"))
register(Family("qwen3_moe", moe="qwen", qk_norm=True))
# Biased router and experts, softmax over the top-k logits, clamped SwiGLU (models/moe_gpt_oss.py).
register(Family("gpt_oss", moe="gpt_oss", attention_sinks=True))
register(Family("deepseek_v3", moe="qwen", mla=True))  # experts stored as Qwen's
register(Family("qwen3_5_text", qk_norm=True, gemma_norms=True, gated_delta_net=True))
register(
    Family("qwen3_5_moe_text", moe="qwen", qk_norm=True, gemma_norms=True, gated_delta_net=True)
)

# Mixtures of experts that transformers implements and sft_jax does not (yet): what each needs.
NOT_YET = {
    "deepseek_v2": "MLA attention and group-limited routing (n_group, topk_group)",
    "olmoe": "q/k norms over all heads, routing like qwen2_moe",
    "qwen3_next": "gated delta-net linear attention layers",
    "glm4_moe": "sigmoid routing with a score-correction bias and group-limited top-k",
}


def family_of(model_type: str | None) -> Family:
    """The registered family of a config.json's model_type, or an error saying why not."""
    supported = ", ".join(FAMILIES.names())
    if model_type in NOT_YET:
        raise UnsupportedModelError(
            f"model_type {model_type!r} (config.json) is a mixture of experts sft_jax does not "
            f"implement yet: it needs {NOT_YET[model_type]}. Supported: {supported}."
        )
    if model_type not in FAMILIES.entries:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported by sft_jax; supported: {supported}."
        )
    return FAMILIES.entries[model_type]
