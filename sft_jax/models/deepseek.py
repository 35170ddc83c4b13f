"""DeepSeek-V3's config.json fields (transformers' DeepseekV3Config) as ModelConfig fields:
multi-head latent attention (models/mla.py) and the group-limited sigmoid router
(models/group_routing.py), or UnsupportedModelError naming the field sft_jax cannot follow."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from sft_jax.models.families import UnsupportedModelError


@dataclasses.dataclass(frozen=True)
class MLASpec:
    """Multi-head latent attention: queries through a low-rank latent (or one projection), keys
    and values from one shared latent, each head's q/k split into a part without position
    (nope) and a rotated part (rope) whose key is shared by all heads."""

    q_lora_rank: int  # width of the query latent; 0: one q_proj (config.json q_lora_rank null)
    kv_lora_rank: int  # width of the key/value latent
    qk_nope_head_dim: int  # per head: the q/k dimensions without RoPE
    qk_rope_head_dim: int  # per head: the rotated q/k dimensions (the key's shared by all heads)
    v_head_dim: int  # per head: the value's width
    rope_interleave: bool  # RoPE over pairs (x0, x1), (x2, x3)... rather than the two halves

    def matmul_params(self, hidden_size: int, heads: int) -> int:
        """Weights of the attention's linear layers (what each token multiplies through)."""
        qk_width = heads * (self.qk_nope_head_dim + self.qk_rope_head_dim)
        if self.q_lora_rank:
            queries = (hidden_size + qk_width) * self.q_lora_rank
        else:
            queries = hidden_size * qk_width
        latent = hidden_size * (self.kv_lora_rank + self.qk_rope_head_dim)
        expand = self.kv_lora_rank * heads * (self.qk_nope_head_dim + self.v_head_dim)
        return queries + latent + expand + heads * self.v_head_dim * hidden_size


def _mscale(factor: float, mscale: float) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def softmax_scale(qk_head_dim: int, rope_parameters: dict[str, Any]) -> float:
    """qk_head_dim ** -0.5, times mscale(factor, mscale_all_dim) ** 2 under a scaled RoPE that
    sets mscale_all_dim (YaRN): DeepSeek scales every q.k product, not only the rotated part
    (transformers' yarn_apply_mscale)."""
    scale = qk_head_dim**-0.5
    rope_type = rope_parameters.get("rope_type", rope_parameters.get("type", "default"))
    mscale_all_dim = rope_parameters.get("mscale_all_dim") or 0
    if rope_type != "default" and mscale_all_dim:
        scale *= _mscale(rope_parameters["factor"], mscale_all_dim) ** 2
    return scale


def _required_int(hf: Any, field: str) -> int:
    value = getattr(hf, field, None)
    if value is None or int(value) < 0:
        raise UnsupportedModelError(
            f"{hf.model_type}: config.json field {field}={value!r}: expected an integer >= 0."
        )
    return int(value)


def mla_fields(hf: Any) -> dict[str, Any]:
    """The attention fields of a DeepSeek-V3 config: an MLASpec, the q/k head width, one key and
    value head per query head, and the softmax scale."""
    heads = hf.num_attention_heads
    if (hf.num_key_value_heads or heads) != heads:
        raise UnsupportedModelError(
            f"{hf.model_type}: config.json num_key_value_heads={hf.num_key_value_heads} differs "
            f"from num_attention_heads={heads}; latent attention expands keys and values to "
            "every head (transformers cannot run that config either). Set them equal."
        )
    spec = MLASpec(
        q_lora_rank=int(hf.q_lora_rank or 0),
        kv_lora_rank=_required_int(hf, "kv_lora_rank"),
        qk_nope_head_dim=_required_int(hf, "qk_nope_head_dim"),
        qk_rope_head_dim=_required_int(hf, "qk_rope_head_dim"),
        v_head_dim=_required_int(hf, "v_head_dim"),
        rope_interleave=bool(getattr(hf, "rope_interleave", True)),
    )
    qk_head_dim = spec.qk_nope_head_dim + spec.qk_rope_head_dim
    return {
        "mla": spec,
        "head_dim": qk_head_dim,
        "num_kv_heads": heads,
        "query_scale": softmax_scale(qk_head_dim, dict(hf.rope_parameters)),
    }


def routing_fields(hf: Any) -> dict[str, Any]:
    """The expert fields of a DeepSeek-V3 config: experts from layer first_k_dense_replace on,
    sigmoid group-limited routing, n_shared_experts ungated shared experts."""
    experts, top_k = _required_int(hf, "n_routed_experts"), _required_int(hf, "num_experts_per_tok")
    groups, top_groups = _required_int(hf, "n_group"), _required_int(hf, "topk_group")
    if groups < 1 or experts % groups or experts // groups < 2:
        raise UnsupportedModelError(
            f"{hf.model_type}: config.json n_group={groups} must divide n_routed_experts="
            f"{experts} into groups of at least 2 experts (a group scores by its top two)."
        )
    if not 1 <= top_groups <= groups or not 1 <= top_k <= top_groups * (experts // groups):
        raise UnsupportedModelError(
            f"{hf.model_type}: config.json topk_group={top_groups}, num_experts_per_tok={top_k}: "
            f"expected 1 <= topk_group <= n_group={groups} and 1 <= num_experts_per_tok <= "
            "the experts of topk_group groups."
        )
    first_sparse = _required_int(hf, "first_k_dense_replace")
    return {
        "num_experts": experts,
        "experts_per_token": top_k,
        "moe_intermediate_size": hf.moe_intermediate_size,
        "norm_topk_prob": bool(hf.norm_topk_prob),
        "moe_layers": tuple(range(first_sparse, hf.num_hidden_layers)),
        "shared_expert_intermediate_size": hf.moe_intermediate_size
        * _required_int(hf, "n_shared_experts"),
        "shared_expert_gated": False,
        "expert_names": "qwen",
        "router_scoring": "sigmoid",
        "router_groups": groups,
        "router_top_groups": top_groups,
        "routed_scaling_factor": float(hf.routed_scaling_factor),
    }


def deepseek_fields(hf: Any) -> dict[str, Any]:
    """Every ModelConfig field a DeepSeek-V3 config sets beyond the common ones."""
    return {**mla_fields(hf), **routing_fields(hf)}
