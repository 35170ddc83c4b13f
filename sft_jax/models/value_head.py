"""PPO's critic: a value per position of a sequence, trained beside the policy.

Either a head on the policy's trunk (ValueHead: a scalar from the final hidden state, after the
final norm, as TRL's ValueHead reads it: a Linear(hidden_size, 1) with a bias), or a separate
model with a score head (a reward model's export, TRL's `value_model`) whose weights become
CriticWeights. Both are trained with the policy whatever else trains (full fine-tuning, or
adapters on a frozen base), kept in checkpoints and left out of the exported checkpoint: they
are Variables of their own types, not the causal LM's nnx.Params."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sft_jax.models.layers import einsum_f32


class ValueWeight(nnx.Variable):
    """A value head's parameter."""


class CriticWeight(nnx.Variable):
    """A parameter of a separate critic model."""


# What a run with a critic trains besides its own trainable variables.
CRITIC_WEIGHTS = nnx.Any(ValueWeight, CriticWeight)


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


def attach_critic(model: nnx.Module, critic: nnx.Module) -> None:
    """model.critic: `critic` (a model with a one-label score head), its parameters turned into
    CriticWeights in place."""
    for _, node in nnx.iter_graph(critic):
        if isinstance(node, nnx.Module):
            for name, value in list(vars(node).items()):
                if isinstance(value, nnx.Param):
                    setattr(node, name, CriticWeight(value.get_value(), **value.get_metadata()))
    model.critic = critic


def values(model: nnx.Module, hidden_BxTxD: jax.Array, batch: dict[str, jax.Array]) -> jax.Array:
    """The critic's values [B, T] (float32) of a batch whose policy hidden states are given."""
    critic = getattr(model, "critic", None)
    if critic is None:
        return model.value_head(hidden_BxTxD)
    hidden, _ = critic.forward(batch["input_ids"], batch["positions"], batch["segment_ids"])
    return critic.scores(hidden)[..., 0]
