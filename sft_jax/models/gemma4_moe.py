"""Gemma 4's expert block (enable_moe_block, e.g. gemma-4-26B-A4B): beside each layer's dense
MLP, as transformers' Gemma4TextDecoderLayer computes it (h the residual stream after
attention, X experts, K chosen per token, F = moe_intermediate_size):
  dense   = post_feedforward_layernorm_1(mlp(pre_feedforward_layernorm(h)))
  r       = rmsnorm_without_scale(h) * router.scale * D ** -0.5
  p       = softmax(r @ router.proj)  (float32);  top-K of p, renormalised to sum 1, each
            times router.per_expert_scale[expert]
  experts = post_feedforward_layernorm_2(sum_k w_k * expert_k(pre_feedforward_layernorm_2(h)))
  out     = post_feedforward_layernorm(dense + experts)
expert_k(x) = down_k(act(gate_k x) * up_k x), gate and up fused as experts.gate_up_proj
[X, 2F, D] (gate first), down as experts.down_proj [X, D, F]: stored here in that layout.
Dimension legend as in decoder.py, N tokens, X experts, K chosen.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sft_jax.models.config import ModelConfig
from sft_jax.models.layers import RMSNorm, normal_init
from sft_jax.models.moe import dropless_experts
from sft_jax.models.per_layer import rms_normalize


class Gemma4Experts(nnx.Module):
    """The expert branch and the norms around both branches (see the module docstring)."""

    def __init__(self, config: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        c = config
        experts, width, hidden = c.num_experts, c.moe_intermediate_size, c.hidden_size
        self.dtype, self.eps, self.top_k = dtype, c.rms_norm_eps, c.experts_per_token
        self.activation = c.activation
        self.router_proj = nnx.Param(
            normal_init(rngs, (experts, hidden), param_dtype), logical_axes=(None, "embed")
        )
        self.router_scale = nnx.Param(jnp.ones((hidden,), param_dtype), logical_axes=("norm",))
        self.per_expert_scale = nnx.Param(jnp.ones((experts,), param_dtype), logical_axes=(None,))
        self.gate_up = nnx.Param(
            normal_init(rngs, (experts, 2 * width, hidden), param_dtype),
            logical_axes=("expert", "mlp", "embed"),
        )
        self.down = nnx.Param(
            normal_init(rngs, (experts, hidden, width), param_dtype),
            logical_axes=("expert", "embed", "mlp"),
        )
        norm = {"eps": c.rms_norm_eps, "plus_one": False, "param_dtype": param_dtype}
        self.dense_post_norm = RMSNorm(hidden, **norm)  # post_feedforward_layernorm_1
        self.pre_norm = RMSNorm(hidden, **norm)  # pre_feedforward_layernorm_2
        self.post_norm = RMSNorm(hidden, **norm)  # post_feedforward_layernorm_2

    def route(self, h_NxD: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(chosen experts [N, K], their weights [N, K] in float32)."""
        hidden = h_NxD.shape[-1]
        scale = self.router_scale[...].astype(self.dtype) * jnp.asarray(hidden**-0.5, self.dtype)
        routed_NxD = rms_normalize(h_NxD, self.eps) * scale[None, :]
        scores_NxX = jnp.einsum(
            "ND,XD->NX", routed_NxD, self.router_proj[...].astype(self.dtype)
        ).astype(jnp.float32)
        weights_NxK, experts_NxK = jax.lax.top_k(jax.nn.softmax(scores_NxX, axis=-1), self.top_k)
        weights_NxK = weights_NxK / jnp.sum(weights_NxK, axis=-1, keepdims=True)
        per_expert = jnp.take(self.per_expert_scale[...].astype(jnp.float32), experts_NxK)
        return experts_NxK, weights_NxK * per_expert

    def __call__(self, h_BxTxD: jax.Array, dense_BxTxD: jax.Array) -> jax.Array:
        """dense + experts (before post_feedforward_layernorm) from the residual stream h and
        the dense MLP's output."""
        batch, seq_len, hidden = h_BxTxD.shape
        h_NxD = h_BxTxD.reshape(batch * seq_len, hidden)
        experts_NxK, weights_NxK = self.route(h_NxD)
        gate_up = self.gate_up[...].astype(self.dtype)
        width = gate_up.shape[1] // 2
        gate_XxDxF = jnp.swapaxes(gate_up[:, :width], 1, 2)
        up_XxDxF = jnp.swapaxes(gate_up[:, width:], 1, 2)
        down_XxFxD = jnp.swapaxes(self.down[...].astype(self.dtype), 1, 2)
        mixed_NxD = dropless_experts(
            self.pre_norm(h_NxD),
            experts_NxK,
            weights_NxK,
            gate_XxDxF,
            up_XxDxF,
            down_XxFxD,
            self.activation,
        )
        experts_BxTxD = self.post_norm(mixed_NxD.astype(self.dtype).reshape(h_BxTxD.shape))
        return self.dense_post_norm(dense_BxTxD) + experts_BxTxD
