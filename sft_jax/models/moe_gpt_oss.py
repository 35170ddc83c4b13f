"""gpt-oss's expert block: a router with a bias whose top-k logits are softmaxed (the weights
sum to one over the chosen experts), experts with biases on every projection, and the clamped
SwiGLU (up + 1) * g * sigmoid(alpha * g) with g = min(gate, limit), up clipped to
[-limit, limit] (transformers' GptOssExperts._apply_gate). The checkpoint fuses gate and up
into one interleaved gate_up_proj (models/io/gpt_oss.py splits and re-interleaves it).

Dimension legend as in moe.py: N tokens, D model width, F expert width, X experts, K experts per
token, M = N * K token copies.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from sft_jax.models.config import ModelConfig
from sft_jax.models.kernels.grouped_matmul import grouped_matmul_kind
from sft_jax.models.moe import EXPERT_PARAMS, MoEBlock, RouterStats, router_stats
from sft_jax.models.partitioning import experts_per_shard

# The stacked expert biases, by attribute name, in the order of EXPERT_PARAMS.
EXPERT_BIASES = ("experts_gate_bias", "experts_up_bias", "experts_down_bias")


def clamped_swiglu(gate_MxF: jax.Array, up_MxF: jax.Array, alpha: float, limit: float):
    gate_MxF = jnp.minimum(gate_MxF, limit)
    up_MxF = jnp.clip(up_MxF, -limit, limit)
    return (up_MxF + 1) * (gate_MxF * jax.nn.sigmoid(gate_MxF * alpha))


def route_top_k_softmax(
    x_NxD: jax.Array, router_DxX: jax.Array, router_bias: jax.Array, top_k: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(router logits [N, X] with the bias, chosen experts [N, K], softmax of their logits)."""
    logits_NxX = jnp.einsum("ND,DX->NX", x_NxD.astype(jnp.float32), router_DxX.astype(jnp.float32))
    logits_NxX = logits_NxX + router_bias.astype(jnp.float32)[None, :]
    top_logits_NxK, experts_NxK = jax.lax.top_k(logits_NxX, top_k)
    return logits_NxX, experts_NxK, jax.nn.softmax(top_logits_NxK, axis=-1)


def biased_experts(
    x_NxD: jax.Array,
    experts_NxK: jax.Array,
    weights_NxK: jax.Array,
    gate_XxDxF: jax.Array,
    up_XxDxF: jax.Array,
    down_XxFxD: jax.Array,
    gate_bias_XxF: jax.Array,
    up_bias_XxF: jax.Array,
    down_bias_XxD: jax.Array,
    *,
    alpha: float,
    limit: float,
    grouped_matmul: str = "ragged_dot",
) -> jax.Array:
    """sum_k weight[n, k] * expert[n, k](x[n]), dropless as moe.dropless_experts, every matmul
    followed by its expert's bias. A copy routed to an expert id >= X (another device's) gets
    no bias, so its output row stays zero."""
    matmul = grouped_matmul_kind(grouped_matmul)
    num_tokens, top_k = experts_NxK.shape
    num_experts = gate_XxDxF.shape[0]
    flat_experts = experts_NxK.reshape(-1)
    order = jnp.argsort(flat_experts, stable=True)
    sorted_experts_M = flat_experts[order]
    group_sizes = jnp.sum(jax.nn.one_hot(flat_experts, num_experts, dtype=jnp.int32), axis=0)
    local_Mx1 = (sorted_experts_M < num_experts)[:, None]

    def bias_of(bias_XxO: jax.Array) -> jax.Array:
        rows = jnp.take(bias_XxO, jnp.minimum(sorted_experts_M, num_experts - 1), axis=0)
        return jnp.where(local_Mx1, rows, 0).astype(x_NxD.dtype)

    x_MxD = jnp.take(x_NxD, order // top_k, axis=0)
    gate_MxF = matmul(x_MxD, gate_XxDxF, group_sizes) + bias_of(gate_bias_XxF)
    up_MxF = matmul(x_MxD, up_XxDxF, group_sizes) + bias_of(up_bias_XxF)
    hidden_MxF = clamped_swiglu(gate_MxF, up_MxF, alpha, limit).astype(x_NxD.dtype)
    out_MxD = matmul(hidden_MxF, down_XxFxD, group_sizes) + bias_of(down_bias_XxD)
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0]))
    out_NxKxD = jnp.take(out_MxD, inverse, axis=0).reshape(num_tokens, top_k, -1)
    combined_NxD = jnp.einsum(
        "NKD,NK->ND", out_NxKxD.astype(jnp.float32), weights_NxK.astype(jnp.float32)
    )
    return combined_NxD.astype(x_NxD.dtype)


class GptOssMoEBlock(MoEBlock):
    """MoEBlock with gpt-oss's router, biases and clamped SwiGLU; the stacked weights, their
    adapters and quantized storage as MoEBlock's. Biases start at zero (transformers' init)."""

    def __init__(self, config: ModelConfig, *, dtype, param_dtype, rngs):
        super().__init__(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        c = config
        x, d, f = c.num_experts, c.hidden_size, c.moe_intermediate_size
        self.alpha, self.limit = c.swiglu_alpha, c.swiglu_limit
        self.router_logit_bias = nnx.Param(jnp.zeros((x,), param_dtype), logical_axes=(None,))
        zeros = functools.partial(jnp.zeros, dtype=param_dtype)
        self.experts_gate_bias = nnx.Param(zeros((x, f)), logical_axes=("expert", "mlp"))
        self.experts_up_bias = nnx.Param(zeros((x, f)), logical_axes=("expert", "mlp"))
        self.experts_down_bias = nnx.Param(zeros((x, d)), logical_axes=("expert", "embed"))

    def __call__(
        self, x_BxTxD: jax.Array, real_BxT: jax.Array, dropout_key: jax.Array | None = None
    ) -> tuple[jax.Array, RouterStats]:
        """(output [B, T, D], router statistics over the tokens where real_BxT is true)."""
        del dropout_key  # no dense adapters inside the block
        batch, seq_len, width = x_BxTxD.shape
        x_NxD = x_BxTxD.astype(self.dtype).reshape(batch * seq_len, width)
        logits_NxX, experts_NxK, weights_NxK = route_top_k_softmax(
            x_NxD, self.router[...], self.router_logit_bias[...], self.top_k
        )
        weights = tuple(self.expert_weight(name) for name in EXPERT_PARAMS)
        biases = tuple(getattr(self, name)[...].astype(self.dtype) for name in EXPERT_BIASES)
        local = functools.partial(
            biased_experts, alpha=self.alpha, limit=self.limit, grouped_matmul=self.grouped_matmul
        )
        out_NxD = experts_per_shard(
            local, x_NxD, experts_NxK, weights_NxK, (*weights, *biases), dispatch=self.dispatch
        )
        stats = router_stats(logits_NxX, experts_NxK, real_BxT.reshape(-1))
        return out_NxD.reshape(batch, seq_len, width), stats
