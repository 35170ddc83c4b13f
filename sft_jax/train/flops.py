"""Model FLOPs per trained token and the devices' peak FLOP/s: what MFU is made of."""

from __future__ import annotations

import jax

from sft_jax.models.config import ModelConfig

# Dense bf16 peak FLOP/s per device, from the vendors' data sheets; matched by substring of
# jax's device_kind. Devices not listed need config.log.peak_tflops_per_device for MFU.
PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "A100": 312.0,
    "L4": 121.0,
    "TPU v6": 918.0,
    "TPU v5p": 459.0,
    "TPU v5 lite": 197.0,
    "TPU v5e": 197.0,
    "TPU v4": 275.0,
}


def peak_flops_per_device(override_tflops: float = 0.0) -> float:
    """Peak FLOP/s of one local device; 0.0 when unknown (then MFU is not reported)."""
    if override_tflops > 0:
        return override_tflops * 1e12
    kind = jax.devices()[0].device_kind
    for name, tflops in PEAK_BF16_TFLOPS.items():
        if name.lower() in kind.lower():
            return tflops * 1e12
    return 0.0


def matmul_params(config: ModelConfig) -> int:
    """Parameters that take part in matrix products (every linear layer and the LM head).

    The input embedding is a lookup, not a product, so it does not count unless it is tied
    to the LM head (then it counts once, as the head). In a mixture of experts only the
    *active* parameters count: the router, the k experts a token runs through, the shared
    expert and its gate.
    """
    c = config
    query_heads = c.num_heads * (2 if c.attn_output_gate else 1)  # Qwen3.5's gate doubles q_proj
    attention = c.hidden_size * c.head_dim * (query_heads + c.num_heads + 2 * c.num_kv_heads)
    if c.mla is not None:  # latent attention (DeepSeek-V3)
        attention = c.mla.matmul_params(c.hidden_size, c.num_heads)
    linear_layers = c.layer_types.count("linear_attention")  # Gated DeltaNets (Qwen3.5)
    shared = c.shared_expert_intermediate_size
    mlp = 3 * c.hidden_size * c.intermediate_size
    moe = c.hidden_size * (
        c.num_experts
        + 3 * c.experts_per_token * c.moe_intermediate_size
        + (3 * shared + c.shared_expert_gated if shared else 0)  # + the gate's column
    )
    num_moe = len(c.moe_layers)
    dense_layers = c.num_layers - num_moe
    return (
        (c.num_layers - linear_layers) * attention
        + (linear_layers * _delta_net_params(c) if linear_layers else 0)
        + dense_layers * mlp
        + num_moe * moe
        + (c.score_labels or c.vocab_size) * c.hidden_size  # a reward model's head: its score
    )


def _delta_net_params(config: ModelConfig) -> int:
    """The projections of a Gated DeltaNet layer (in_proj_qkv, _z, _b, _a, out_proj) and its
    depthwise convolution (one multiply-add per weight and token, as a matmul's)."""
    s = config.linear_attention
    value_width = s.num_value_heads * s.value_head_dim
    widths = s.conv_channels + 2 * value_width + 2 * s.num_value_heads
    return config.hidden_size * widths + s.conv_channels * s.conv_kernel


def training_flops_per_token(
    config: ModelConfig,
    seq_len: int,
    adapter_params: int | None = None,
    reference_forwards: int = 0,
) -> float:
    """Model FLOPs per trained token for forward + backward (what MFU divides by peak).

    6 * matmul_params, plus attention scores and values: forward 4 * T * H * E per token per
    layer (q.k and p.v), times 3 for forward + backward, halved because causal masking leaves
    half of the T x T products. Packed rows are counted as one causal sequence of T tokens.
    Gated DeltaNet layers (Qwen3.5) count their projections only, not the delta rule's scan.
    Remat recomputation is not counted (this is model FLOPs utilization, not hardware).

    With LoRA (`adapter_params` = trained parameters) the frozen base costs 4 * N, forward and
    the input-gradient half of backward (no weight gradients), and the trained parameters 6
    each; dequantizing a QLoRA base is not counted.

    reference_forwards: forward passes the objective adds per step without a backward (DPO's
    reference model: 2 * N + the attention's forward third each). Preference pairs need no
    factor: the chosen and rejected sequences are both tokens of the rows.
    """
    c = config
    # q.k over head_dim, p.v over the value heads' width (they differ under MLA); the Gated
    # DeltaNet layers' scan is not counted.
    full_layers = c.num_layers - c.layer_types.count("linear_attention")
    attention = 3 * full_layers * seq_len * c.num_heads * (c.head_dim + c.value_head_dim)
    reference = reference_forwards * (2 * matmul_params(c) + attention / 3)
    if adapter_params is None:
        return 6 * matmul_params(c) + attention + reference
    return 4 * matmul_params(c) + attention + 6 * adapter_params + reference
