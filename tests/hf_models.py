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
    # Attention sinks, biases on q/k/v/o, sliding and full layers, YaRN (truncate off), biased
    # router and experts, softmax over the top 2 of 4 logits; the SwiGLU's limit so low that
    # its clamps act (a quarter of the gate and half of the up units of these random weights
    # are clipped; 7.0 in the real model).
    "gpt_oss": (
        transformers.GptOssConfig,
        {
            "head_dim": 16,
            "intermediate_size": 32,
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
            "sliding_window": 5,
            "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
            "rope_parameters": {
                "rope_type": "yarn",
                "rope_theta": 150000.0,
                "factor": 4.0,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "truncate": False,
                "original_max_position_embeddings": 16,
            },
            "swiglu_limit": 0.6,
            "max_position_embeddings": 64,  # YaRN: factor 4 x 16
            "router_aux_loss_coef": 0.02,
        },
    ),
    # Gemma 4: per-layer input embeddings, the last two layers sharing layers 0 and 1's keys
    # and values with double-wide MLPs, full layers of their own head_dim and kv heads whose
    # values are their keys (k_eq_v), proportional RoPE on a quarter of them.
    "gemma4": (
        transformers.Gemma4TextConfig,
        {
            "num_hidden_layers": 4,
            "head_dim": 16,
            "global_head_dim": 32,
            "num_global_key_value_heads": 1,
            "attention_k_eq_v": True,
            "num_kv_shared_layers": 2,
            "use_double_wide_mlp": True,
            "hidden_size_per_layer_input": 8,
            "vocab_size_per_layer_input": VOCAB,
            "sliding_window": 5,
            "layer_types": ["sliding_attention", "full_attention"] * 2,
            "final_logit_softcapping": 10.0,
            "rope_parameters": {
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {
                    "rope_type": "proportional",
                    "partial_rotary_factor": 0.25,
                    "rope_theta": 1000000.0,
                },
            },
        },
    ),
    # Latent attention with a query latent, YaRN with mscale_all_dim (the softmax scale) over
    # interleaved rope dims; 8 experts in 4 groups of which the best 2 are searched, a random
    # score-correction bias (randomize_), 2 shared experts, a dense first layer.
    "deepseek_v3": (
        transformers.DeepseekV3Config,
        {
            "num_key_value_heads": 4,
            "rms_norm_eps": 1e-5,
            "q_lora_rank": 24,
            "kv_lora_rank": 16,
            "qk_nope_head_dim": 12,
            "qk_rope_head_dim": 8,
            "v_head_dim": 10,
            "n_routed_experts": 8,
            "n_group": 4,
            "topk_group": 2,
            "num_experts_per_tok": 3,
            "moe_intermediate_size": 16,
            "n_shared_experts": 2,
            "first_k_dense_replace": 1,
            "routed_scaling_factor": 2.5,
            "norm_topk_prob": True,
            "rope_parameters": {
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 16,
                "mscale": 0.9,
                "mscale_all_dim": 0.7,
            },
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
    # Norms that scale by (1 + w) stay near 0: Gemma 2/3's and Qwen3.5's (but its DeltaNet's
    # gated norm); Gemma 4's scale by w; Gemma 4's layer scalars are buffers.
    plus_one = model.config.model_type in ("gemma2", "gemma3_text")
    plus_one = plus_one or model.config.model_type.startswith("qwen3_5")
    unscaled_scores = model.config.model_type == "gemma4_text"
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * 0.1
            is_norm = name.endswith("norm.weight")
            near_one = is_norm and (not plus_one or name.endswith("linear_attn.norm.weight"))
            if name.endswith("A_log"):  # slow decay (exp(A) ~ 0.02): states remember far back
                noise = noise + np.log(0.02)
            center = 1.0 if near_one else 0.0
            if name.endswith(("q_norm.weight", "k_norm.weight")) and unscaled_scores:
                # Gemma 4 leaves q.k unscaled (its q/k norms set the scale): keep the scores of
                # order one, as head_dim ** -0.5 does, so that bf16 rounding stays small.
                center = param.shape[-1] ** -0.25
            param.copy_(noise + center)
        for name, buffer in model.named_buffers():
            if name.endswith("layer_scalar"):
                buffer.copy_(1.0 + torch.randn(buffer.shape, generator=generator) * 0.1)
            if name.endswith("e_score_correction_bias"):  # DeepSeek-V3's routing bias
                buffer.copy_(torch.randn(buffer.shape, generator=generator) * 0.3)


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


def transformers_greedy(hf_model, prompts: list[list[int]], new_tokens: int, eos: int) -> list:
    """transformers' greedy continuation of each prompt alone (eos stops it; pad id 0)."""
    out = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            tokens = hf_model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                do_sample=False, eos_token_id=[eos], pad_token_id=0,
            )  # fmt: skip
        out.append(tokens[0, len(prompt) :].tolist())
    return out
