"""PPO's critic on the policy's trunk: a scalar value per position from the final hidden state
(after the final norm), as TRL's ValueHead (a Linear(hidden_size, 1) with a bias) reads it.

Its weights are ValueWeights, trained with the policy whatever else trains (full fine-tuning,
or adapters with a frozen base), kept in checkpoints and left out of the exported checkpoint
(a causal LM's, which has no value head)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sft_jax.models.layers import einsum_f32


class ValueWeight(nnx.Param):
    """A value head's parameter: trained in every run that has one."""


class ValueHead(nnx.Module):
    """Initialised to zero: every first value is 0, the returns teach the rest (no random
    critic to unlearn)."""

    def __init__(self, hidden_size: int, param_dtype: jnp.dtype = jnp.float32):
        self.weight = ValueWeight(jnp.zeros((hidden_size,), param_dtype), logical_axes=("embed",))
        self.bias = ValueWeight(jnp.zeros((), param_dtype), logical_axes=())

    def __call__(self, hidden_BxTxD: jax.Array) -> jax.Array:
        """Values [B, T], float32."""
        weight = self.weight[...].astype(hidden_BxTxD.dtype)
        return einsum_f32("BTD,D->BT", hidden_BxTxD, weight) + self.bias[...].astype(jnp.float32)


def attach_value_head(model: nnx.Module) -> None:
    """model.value_head: a new ValueHead as wide as the model's hidden states, in the dtype of
    its (never quantized) final norm."""
    dtype = model.final_norm.scale[...].dtype
    model.value_head = ValueHead(model.config.hidden_size, dtype)
