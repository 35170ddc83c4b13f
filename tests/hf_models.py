"""Tiny random transformers models, one per supported family, saved as Hugging Face directories."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers

VOCAB = 128
_COMMON = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}
_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # Small so that the blended band falls inside a 16-token test sequence.
    "original_max_position_embeddings": 16,
}

# Each family's config exercises what sets it apart.
FAMILIES: dict[str, tuple[type, dict]] = {
    "llama2": (transformers.LlamaConfig, {"num_key_value_heads": 4, "rope_theta": 10000.0}),
    "llama3.1": (
        transformers.LlamaConfig,
        {"rope_theta": 500000.0, "rope_scaling": _LLAMA3_ROPE},
    ),
    "llama3.2": (
        transformers.LlamaConfig,
        {
            "num_key_value_heads": 1,
            "tie_word_embeddings": True,
            "rope_theta": 500000.0,
            "rope_scaling": _LLAMA3_ROPE,
            "head_dim": 8,
            "attention_bias": True,
            "mlp_bias": True,
        },
    ),
    "mistral": (transformers.MistralConfig, {"sliding_window": 5, "head_dim": 24}),
    "qwen2": (
        transformers.Qwen2Config,
        {
            "tie_word_embeddings": True,
            "use_sliding_window": True,
            "sliding_window": 5,
            "max_window_layers": 1,
        },
    ),
    "qwen3": (transformers.Qwen3Config, {"head_dim": 24, "tie_word_embeddings": True}),
    "gemma2": (
        transformers.Gemma2Config,
        {
            "head_dim": 32,
            "query_pre_attn_scalar": 24,
            "attn_logit_softcapping": 5.0,
            "final_logit_softcapping": 3.0,
            "sliding_window": 5,
            "hidden_activation": "gelu_pytorch_tanh",
        },
    ),
    "gemma3": (
        transformers.Gemma3TextConfig,
        {
            "head_dim": 32,
            "query_pre_attn_scalar": 24,
            "sliding_window": 5,
            "sliding_window_pattern": 2,
            "rope_theta": 1000000.0,
            "rope_local_base_freq": 10000.0,
            "rope_scaling": {"rope_type": "linear", "factor": 4.0},
        },
    ),
    # Layer 1 (every 2nd) without RoPE, and (by transformers' rule: NoPE layers slide when
    # use_sliding_window is set) windowed.
    "smollm3": (
        transformers.SmolLM3Config,
        {
            "no_rope_layer_interval": 2,
            "use_sliding_window": True,
            "sliding_window": 5,
            "tie_word_embeddings": True,
            "attention_bias": True,
            "rope_theta": 50000.0,
        },
    ),
    # Post-norms only, q/k norms over all heads, a full layer between sliding ones, YaRN on
    # the full layer only.
    "olmo3": (
        transformers.Olmo3Config,
        {
            "sliding_window": 5,
            "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
            "rope_parameters": {
                "full_attention": {
                    "rope_type": "yarn",
                    "rope_theta": 10000.0,
                    "factor": 4.0,
                    "original_max_position_embeddings": 64,
                },
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            },
        },
    ),
    # Mixtures of experts: 4 experts, top 2; dense and sparse layers mixed where the family can.
    "qwen3_moe": (
        transformers.Qwen3MoeConfig,
        {
            "head_dim": 24,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "norm_topk_prob": True,
            "mlp_only_layers": [1],
            "router_aux_loss_coef": 0.01,
        },
    ),
    "mixtral": (
        transformers.MixtralConfig,
        {
            "intermediate_size": 48,
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
            "sliding_window": 5,
            "router_aux_loss_coef": 0.02,
        },
    ),
    "qwen2_moe": (
        transformers.Qwen2MoeConfig,
        {
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "shared_expert_intermediate_size": 80,
            "norm_topk_prob": False,
            "decoder_sparse_step": 2,
            "tie_word_embeddings": True,
        },
    ),
    # Gated DeltaNet layers around a gated full-attention layer; 2 key heads for 4 value heads.
    "qwen3_5": (
        transformers.Qwen3_5TextConfig,
        {
            "head_dim": 16,
            "layer_types": ["linear_attention", "full_attention", "linear_attention"],
            "linear_num_key_heads": 2,
            "linear_num_value_heads": 4,
            "linear_key_head_dim": 8,
            "linear_value_head_dim": 12,
            "linear_conv_kernel_dim": 4,
        },
    ),
    # The same hybrid with an expert block (and a shared expert) in every layer.
    "qwen3_5_moe": (
        transformers.Qwen3_5MoeTextConfig,
        {
            "head_dim": 16,
            "layer_types": ["linear_attention", "full_attention", "linear_attention"],
            "linear_num_key_heads": 2,
            "linear_num_value_heads": 4,
            "linear_key_head_dim": 8,
            "linear_value_head_dim": 12,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "shared_expert_intermediate_size": 48,
            "router_aux_loss_coef": 0.01,
        },
    ),
}
MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "qwen3_5_moe")


def hf_config(family: str, **overrides: Any) -> transformers.PretrainedConfig:
    """The family's tiny config; `overrides` replace its fields (rope scaling, lengths)."""
    config_class, family_overrides = FAMILIES[family]
    # A copy: configs keep (and tests change) nested dicts such as rope_parameters.
    return config_class(**copy.deepcopy({**_COMMON, **family_overrides, **overrides}))


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Large random weights so that every parameter, norms and biases included, shows in logits."""
    # Norms that scale by (1 + w) (Gemma, Qwen3.5 but its DeltaNet's gated norm) stay near 0.
    plus_one = model.config.model_type.startswith(("gemma", "qwen3_5"))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * 0.1
            is_norm = name.endswith("norm.weight")
            near_one = is_norm and (not plus_one or name.endswith("linear_attn.norm.weight"))
            if name.endswith("A_log"):  # slow decay (exp(A) ~ 0.02): states remember far back
                noise = noise + np.log(0.02)
            param.copy_(noise + (1.0 if near_one else 0.0))


def build_hf_model(family: str, seed: int = 0, **overrides: Any) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    config = hf_config(family, **overrides)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    randomize_(model, seed)
    return model.eval().float()


def save_hf_model(
    family: str, out_dir: Path, seed: int = 0, **overrides: Any
) -> transformers.PreTrainedModel:
    model = build_hf_model(family, seed, **overrides)
    model.save_pretrained(out_dir)
    return model


def hf_logits(
    model: transformers.PreTrainedModel,
    input_ids: np.ndarray,
    attention_mask: np.ndarray | None = None,
) -> np.ndarray:
    with torch.no_grad():
        ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long)
        mask = None if attention_mask is None else torch.as_tensor(np.asarray(attention_mask))
        return model(input_ids=ids, attention_mask=mask).logits.float().numpy()


def save_tiny_llama(path: Path, tokenizer: Any) -> None:
    """A tiny random Llama whose vocabulary fits `tokenizer`, saved with it in `path`."""
    tokenizer.save_pretrained(path)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
