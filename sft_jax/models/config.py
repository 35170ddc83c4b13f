"""ModelConfig: one decoder description for every supported Hugging Face family."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import jax.numpy as jnp

from sft_jax.models import gemma3_vision_config as _gemma3_vision  # noqa: F401 (registers gemma3)
from sft_jax.models import gemma4_config as _gemma4_config  # noqa: F401 (registers gemma4_text)
from sft_jax.models import qwen_vl_config as _qwen_vl  # noqa: F401 (registers qwen2_5_vl)
from sft_jax.models.deepseek import MLASpec, deepseek_fields
from sft_jax.models.families import FAMILIES, Family, UnsupportedModelError, family_of
from sft_jax.models.rope import RopeSpec, rope_table

# Parameter and compute dtypes by their config names.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# HF config fields of routing modes the expert block does not implement: any of them present
# (and not at its neutral value) means the checkpoint routes differently.
_UNSUPPORTED_ROUTING_FIELDS = {
    "scoring_func": "softmax",
    "topk_method": "greedy",
    "n_group": 1,
    "topk_group": 1,
    "routed_scaling_factor": 1.0,
    "router_jitter_noise": 0.0,
}
SUPPORTED_MODEL_TYPES = FAMILIES.names()
_ACTIVATIONS = ("silu", "gelu_pytorch_tanh")


@dataclasses.dataclass(frozen=True)
class LinearAttentionSpec:
    """The Gated DeltaNet layers of a hybrid model (config.json's linear_* fields)."""

    num_key_heads: int  # linear_num_key_heads (queries and keys)
    num_value_heads: int  # linear_num_value_heads (a multiple of num_key_heads)
    key_head_dim: int  # linear_key_head_dim
    value_head_dim: int  # linear_value_head_dim
    conv_kernel: int  # linear_conv_kernel_dim: width of the causal depthwise convolution

    @property
    def conv_channels(self) -> int:
        """Channels of the convolution: queries, keys and values side by side."""
        return (
            2 * self.num_key_heads * self.key_head_dim + self.num_value_heads * self.value_head_dim
        )


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything the decoder needs; built from a transformers config by `from_hf_config`."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    activation: str = "silu"
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # bias on q/k/v projections (Qwen2, or attention_bias)
    o_bias: bool = False  # bias on the output projection (attention_bias)
    mlp_bias: bool = False
    qk_norm: bool = False  # RMSNorm over head_dim on q and k (Qwen3, Gemma 3)
    gemma_norms: bool = False  # RMSNorm scales by (1 + w) instead of w
    sandwich_norms: bool = False  # extra norms after attention and after the MLP (Gemma 2/3)
    post_norms: bool = False  # norms after attention and the MLP only, none before (OLMo 2/3)
    qk_norm_full: bool = False  # the q/k norms span all heads' projection, not one head (OLMo)
    nope_layers: tuple[int, ...] = ()  # indices of the layers without RoPE (SmolLM3's NoPE)
    embed_scale: bool = False  # embeddings multiplied by sqrt(hidden_size) (Gemma)
    query_scale: float = 0.0  # multiplies q.k; 0 means head_dim ** -0.5
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()  # "full_attention" / "sliding_attention" per layer
    rope: tuple[tuple[str, RopeSpec], ...] = ()  # layer type -> RopeSpec
    # Attention kernel of the training forward pass: "xla" (explicit einsums, the reference),
    # "cudnn" (jax.nn.dot_product_attention's fused cuDNN kernel, NVIDIA GPUs) or "splash"
    # (Pallas splash attention with segment ids, TPUs).
    attention: str = "xla"
    # Most segments (documents, and padding as one more) in a row of the training input, or 0
    # when unknown. "cudnn" hands cuDNN a table of this many segments per row (its packed
    # layout) instead of a [B, T, S] mask.
    max_segments: int = 0
    # Mixture of experts (models/moe.py); 0 experts means every layer has a dense MLP.
    num_experts: int = 0
    experts_per_token: int = 0  # top-k
    moe_intermediate_size: int = 0  # F of each expert
    norm_topk_prob: bool = False  # renormalize the top-k router probabilities to sum to 1
    moe_layers: tuple[int, ...] = ()  # indices of the layers whose MLP is the expert block
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE: a dense expert behind a sigmoid gate
    expert_names: str = "qwen"  # checkpoint layout: "qwen" (mlp.experts.N.gate_proj) / "mixtral"
    router_aux_loss_coef: float = 0.0  # weight of the load-balancing loss (HF's default)
    # gpt-oss (expert_names "gpt_oss", models/moe_gpt_oss.py): router and experts with biases,
    # softmax over the top-k router logits, and the clamped SwiGLU of swiglu_alpha and
    # swiglu_limit; attention_sinks: a learned logit per head in the attention softmax.
    swiglu_alpha: float = 0.0
    swiglu_limit: float = 0.0
    attention_sinks: bool = False
    # Layers that differ (Gemma 4, models/gemma4_config.py): per-layer head_dim, kv heads and
    # MLP width (empty: head_dim, num_kv_heads, intermediate_size everywhere); the layer whose
    # keys/values each layer attends with (KV sharing; empty: its own); the layers whose values
    # are their keys' projection (no v_proj); an RMSNorm without scale on values; per-layer
    # input embeddings (PLE) of this width over a table of per_layer_vocab_size rows (0: none);
    # a stored scalar multiplying each layer's output.
    layer_head_dims: tuple[int, ...] = ()
    layer_kv_heads: tuple[int, ...] = ()
    layer_mlp_widths: tuple[int, ...] = ()
    kv_sources: tuple[int, ...] = ()
    value_is_key_layers: tuple[int, ...] = ()
    v_norm: bool = False
    per_layer_input_size: int = 0
    per_layer_vocab_size: int = 0
    layer_scalars: bool = False
    # Gemma 4's expert block beside every layer's dense MLP (models/gemma4_moe.py), with
    # num_experts, experts_per_token and moe_intermediate_size; moe_layers stays empty.
    parallel_experts: bool = False
    # DeepSeek-V3 (models/deepseek.py): "sigmoid" scores whose top-k is chosen with a frozen
    # score-correction bias among the best router_top_groups of router_groups expert groups,
    # the weights scaled by routed_scaling_factor; shared experts without a gate.
    router_scoring: str = "softmax"
    router_groups: int = 1
    router_top_groups: int = 1
    routed_scaling_factor: float = 1.0
    shared_expert_gated: bool = True  # Qwen2-MoE's sigmoid gate on the shared expert
    # Multi-head latent attention (DeepSeek-V3, models/mla.py); None: grouped-query attention.
    mla: MLASpec | None = None
    # A reward model (transformers' *ForSequenceClassification): the outputs of its `score`
    # head [score_labels, D] in place of the LM head; 0 for a causal LM.
    score_labels: int = 0
    # Qwen3.5: attention output times sigmoid(gate), the gate a second half of each q_proj head.
    attn_output_gate: bool = False
    # The Gated DeltaNet of layer_types' "linear_attention" layers; None where there are none.
    linear_attention: LinearAttentionSpec | None = None
    # The vision part of an image-text model (Qwen2.5-VL: qwen_vl_config.VisionSpec, Gemma 3:
    # gemma3_vision_config.VisionSpec); None: text only.
    vision: Any = None
    # The transformers config this came from, written back on export (not part of identity).
    hf_config: dict[str, Any] = dataclasses.field(
        default_factory=dict, compare=False, hash=False, repr=False
    )

    def rope_for(self, layer_type: str) -> RopeSpec:
        return dict(self.rope)[layer_type]

    def rope_of_layer(self, layer_index: int) -> RopeSpec | None:
        """The RoPE of a layer, or None for a layer without position encoding (NoPE)."""
        if layer_index in self.nope_layers:
            return None
        return self.rope_for(self.layer_types[layer_index])

    def window_for(self, layer_index: int) -> int | None:
        """Attention window of a layer in tokens (the query included), or None for full."""
        if self.layer_types[layer_index] == "sliding_attention":
            return self.sliding_window
        return None

    def head_dim_of(self, layer_index: int) -> int:
        return self.layer_head_dims[layer_index] if self.layer_head_dims else self.head_dim

    def kv_heads_of(self, layer_index: int) -> int:
        return self.layer_kv_heads[layer_index] if self.layer_kv_heads else self.num_kv_heads

    def mlp_width_of(self, layer_index: int) -> int:
        return self.layer_mlp_widths[layer_index] if self.layer_mlp_widths else 0

    def kv_source_of(self, layer_index: int) -> int:
        """The layer whose keys and values this layer attends with (its own index unless
        it shares an earlier layer's)."""
        return self.kv_sources[layer_index] if self.kv_sources else layer_index

    def is_moe_layer(self, layer_index: int) -> bool:
        return layer_index in self.moe_layers

    @property
    def attention_scale(self) -> float:
        return self.query_scale or self.head_dim**-0.5

    def attention_scale_of(self, layer_index: int) -> float:
        return self.query_scale or self.head_dim_of(layer_index) ** -0.5

    @property
    def value_head_dim(self) -> int:
        """Width of each value head (MLA's v_head_dim differs from the q/k head_dim)."""
        return self.mla.v_head_dim if self.mla else self.head_dim


def _layer_types(hf: Any, num_layers: int) -> tuple[str, ...]:
    layer_types = getattr(hf, "layer_types", None)
    if layer_types:
        return tuple(layer_types)
    # Mistral: one window for every layer when configured.
    kind = "sliding_attention" if getattr(hf, "sliding_window", None) else "full_attention"
    return (kind,) * num_layers


def _nope_layers(hf: Any, family: Family, layer_types: tuple[str, ...]) -> tuple[int, ...]:
    """The layers without RoPE of a family that reads config.json's no_rope_layers (1: the
    layer rotates, 0: it does not; SmolLM3 derives it from no_rope_layer_interval), or an
    UnsupportedModelError naming the field sft_jax cannot follow."""
    if not family.no_rope_layers:
        return ()
    flags = list(hf.no_rope_layers)
    if len(flags) != len(layer_types):
        raise UnsupportedModelError(
            f"{family.model_type}: config.json no_rope_layers has {len(flags)} entries for "
            f"{len(layer_types)} layers (num_hidden_layers)."
        )
    if not getattr(hf, "use_sliding_window", False) and "sliding_attention" in layer_types:
        # transformers then gives such layers no window in its attention module but a
        # sliding mask (eager, sdpa): no single behaviour to match.
        raise UnsupportedModelError(
            f"{family.model_type}: config.json layer_types has sliding_attention layers while "
            "use_sliding_window is false; set use_sliding_window=true (windowed) or make "
            "those layers full_attention."
        )
    return tuple(i for i, rotates in enumerate(flags) if not rotates)


def from_hf_config(hf: Any) -> ModelConfig:
    """Translate a `transformers.PretrainedConfig` into a ModelConfig, or explain why not."""
    family = family_of(getattr(hf, "model_type", None))
    if family.text_config:  # the text model of a multimodal checkpoint (and its vision part)
        return _multimodal(hf, family)
    model_type = family.model_type
    _refuse_quantized(hf)
    if getattr(hf, "_heterogeneity_spec", None) is not None:
        # Per-layer attributes (Gemma 4's per_layer_config): read the global ones here, the
        # family's hf_fields the rest; a copy, so that the caller's config stays as it was.
        hf = copy.copy(hf)
        hf.allow_global_per_layer_attribute_access = True
    moe = _moe_fields(hf, family) if family.moe and not family.mla else {}
    activation = getattr(hf, "hidden_activation", None) or hf.hidden_act
    if activation not in _ACTIVATIONS:
        raise UnsupportedModelError(f"{model_type}: activation {activation!r} is not supported.")
    num_layers = hf.num_hidden_layers
    layer_types = _layer_types(hf, num_layers)
    attention_bias = bool(getattr(hf, "attention_bias", False))
    query_pre_attn_scalar = getattr(hf, "query_pre_attn_scalar", None)
    config = ModelConfig(
        model_type=model_type,
        vocab_size=hf.vocab_size,
        hidden_size=hf.hidden_size,
        # Qwen3.5-MoE has none: every layer's MLP is an expert block.
        intermediate_size=getattr(hf, "intermediate_size", 0),
        num_layers=num_layers,
        num_heads=hf.num_attention_heads,
        num_kv_heads=getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads,
        head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads,
        rms_norm_eps=hf.rms_norm_eps,
        activation=activation,
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        qkv_bias=family.qkv_bias or attention_bias or bool(getattr(hf, "qkv_bias", False)),
        o_bias=attention_bias,
        mlp_bias=bool(getattr(hf, "mlp_bias", False)),
        qk_norm=family.qk_norm,
        gemma_norms=family.gemma_norms,
        sandwich_norms=family.sandwich_norms,
        post_norms=family.post_norms,
        qk_norm_full=family.qk_norm_full,
        nope_layers=_nope_layers(hf, family, layer_types),
        embed_scale=family.embed_scale,
        query_scale=query_pre_attn_scalar**-0.5 if query_pre_attn_scalar else 0.0,
        attn_logit_softcap=getattr(hf, "attn_logit_softcapping", None),
        final_logit_softcap=getattr(hf, "final_logit_softcapping", None),
        sliding_window=getattr(hf, "sliding_window", None),
        layer_types=layer_types,
        rope=rope_table(hf, layer_types),
        score_labels=_score_labels(hf),
        attention_sinks=family.attention_sinks,
        **_hybrid_fields(hf, family, layer_types),
        hf_config=hf.to_dict(),
        **moe,
    )
    if family.mla:
        config = dataclasses.replace(config, **deepseek_fields(hf))
    if family.hf_fields is None:
        return config
    return dataclasses.replace(config, **family.hf_fields(hf))


def _multimodal(hf: Any, family: Family) -> ModelConfig:
    """A multimodal checkpoint's text model, with what its family adds (Qwen2.5-VL: the vision
    part, M-RoPE's sections; Gemma 3: its image tower; with a vision part, the whole config.json
    is the one exports write)."""
    text = from_hf_config(hf.get_text_config())
    return text if family.hf_fields is None else dataclasses.replace(text, **family.hf_fields(hf))


def _hybrid_fields(hf: Any, family: Family, layer_types: tuple[str, ...]) -> dict[str, Any]:
    """Qwen3.5's gated attention and Gated DeltaNet layers, or UnsupportedModelError naming a
    layer type sft_jax does not implement."""
    known = ("full_attention", "sliding_attention")
    if family.gated_delta_net:
        known = ("full_attention", "linear_attention")
    unknown = sorted(set(layer_types) - set(known))
    if unknown:
        raise UnsupportedModelError(
            f"{family.model_type}: config.json layer_types has {', '.join(map(repr, unknown))}, "
            f"which sft_jax does not implement for this family (supported: {', '.join(known)})."
        )
    if not family.gated_delta_net:
        return {}
    spec = LinearAttentionSpec(
        num_key_heads=int(hf.linear_num_key_heads),
        num_value_heads=int(hf.linear_num_value_heads),
        key_head_dim=int(hf.linear_key_head_dim),
        value_head_dim=int(hf.linear_value_head_dim),
        conv_kernel=int(hf.linear_conv_kernel_dim),
    )
    if spec.num_value_heads % spec.num_key_heads:
        raise UnsupportedModelError(
            f"{family.model_type}: config.json linear_num_value_heads={spec.num_value_heads} is "
            f"not a multiple of linear_num_key_heads={spec.num_key_heads}."
        )
    return {"attn_output_gate": True, "linear_attention": spec}


def _score_labels(hf: Any) -> int:
    """num_labels of a *ForSequenceClassification checkpoint (its score head), else 0."""
    architectures = getattr(hf, "architectures", None) or ()
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        return int(hf.num_labels)
    return 0


def _moe_fields(hf: Any, family: Family) -> dict[str, Any]:
    """The ModelConfig fields of a mixture of experts, or UnsupportedModelError naming the
    config.json field of a variant the expert block does not implement."""
    model_type = family.model_type
    for field, neutral in _UNSUPPORTED_ROUTING_FIELDS.items():
        value = getattr(hf, field, neutral)
        if value is not None and value != neutral:
            raise UnsupportedModelError(
                f"{model_type}: config.json field {field}={value!r} selects a routing mode "
                f"sft_jax does not implement (supported: {field}={neutral!r} or absent)."
            )
    num_experts, top_k = int(hf.num_experts), int(hf.num_experts_per_tok)
    if num_experts < 1 or not 1 <= top_k <= num_experts:
        raise UnsupportedModelError(
            f"{model_type}: config.json fields num_experts={num_experts}, "
            f"num_experts_per_tok={top_k}: expected 1 <= num_experts_per_tok <= num_experts."
        )
    num_layers = hf.num_hidden_layers
    gpt_oss = {}
    if family.moe == "gpt_oss":  # every layer sparse; softmax over the top k: sums to one
        moe_layers, width, renormalize = tuple(range(num_layers)), hf.intermediate_size, False
        gpt_oss = {"swiglu_alpha": float(hf.swiglu_alpha), "swiglu_limit": float(hf.swiglu_limit)}
    elif family.moe == "mixtral":  # every layer sparse, experts as wide as intermediate_size
        moe_layers, width, renormalize = tuple(range(num_layers)), hf.intermediate_size, True
    else:
        # Qwen3.5-MoE has none of these fields: every layer sparse, top-k renormalized.
        step = int(getattr(hf, "decoder_sparse_step", 1))
        dense = set(getattr(hf, "mlp_only_layers", None) or ())
        moe_layers = tuple(i for i in range(num_layers) if i not in dense and (i + 1) % step == 0)
        width = hf.moe_intermediate_size
        renormalize = bool(getattr(hf, "norm_topk_prob", True))
    return {
        "num_experts": num_experts,
        "experts_per_token": top_k,
        "moe_intermediate_size": width,
        "norm_topk_prob": renormalize,
        "moe_layers": moe_layers,
        "shared_expert_intermediate_size": getattr(hf, "shared_expert_intermediate_size", 0) or 0,
        "expert_names": family.moe,
        "router_aux_loss_coef": float(getattr(hf, "router_aux_loss_coef", 0.0) or 0.0),
        **gpt_oss,
    }


def _refuse_quantized(hf: Any) -> None:
    """Weights stored quantized (config.json quantization_config) are not read by sft_jax,
    but for gpt-oss's MXFP4 experts."""
    quantization = getattr(hf, "quantization_config", None)
    if quantization:
        if isinstance(quantization, dict):
            method = quantization.get("quant_method", "?")
        else:
            method = getattr(quantization, "quant_method", "?")
        if method == "mxfp4" and hf.model_type == "gpt_oss":
            return  # the hub's MXFP4 experts, dequantized as they load (models/io/mxfp4.py)
        raise UnsupportedModelError(
            f"{hf.model_type}: config.json quantization_config (quant_method {method!r}): "
            "sft_jax loads unquantized safetensors (and gpt-oss's MXFP4 experts) only. Use a "
            "dequantized copy (transformers: from_pretrained with the quantizer's "
            "dequantize=True, then save_pretrained) and drop quantization_config."
        )
