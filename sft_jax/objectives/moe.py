"""The SFT objective of a mixture of experts: masked cross-entropy plus the load-balancing loss
of transformers' load_balancing_loss_func (and an optional router z-loss), over real tokens.

The router statistics (models/moe.py, RouterStats) are sums over the real tokens (segment id >
0) of a micro-batch: tokens routed to each expert and router probabilities per expert, per MoE
layer. As in transformers, the load-balancing loss pools every MoE layer:

  f_x = (top-k slots routed to expert x) / (real tokens), P_x = (sum of p_x) / (real tokens),
  aux = X * sum_x f_x * P_x,

which is a product of batch sums, not a sum over tokens. Each micro-batch's aux is the value
transformers computes for that forward pass; with gradient accumulation the step optimizes
their mean (the same as a transformers Trainer that accumulates k forward passes).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from sft_jax.models.decoder import CausalLM
from sft_jax.models.moe import RouterStats
from sft_jax.objectives.loss import CrossEntropy, LossSums, hidden_loss_sums


class MoESums(NamedTuple):
    """Sums over a batch (additive over micro-batches); nll, z, target_tokens as in LossSums."""

    nll: jax.Array
    z: jax.Array
    target_tokens: jax.Array
    expert_load: jax.Array  # [L, X] top-k slots routed to each expert, real tokens only
    router_tokens: jax.Array  # [L] real tokens seen by each MoE layer
    aux: jax.Array  # load-balancing loss of each micro-batch, summed over micro-batches
    router_z: jax.Array  # router z-loss of each micro-batch, summed over micro-batches
    micro_batches: jax.Array  # 1 per micro-batch


def load_balancing_loss(stats: RouterStats) -> jax.Array:
    """transformers' load_balancing_loss_func over the real tokens, every MoE layer pooled."""
    tokens = jnp.maximum(jnp.sum(stats.tokens), 1.0)
    routed_fraction = jnp.sum(stats.expert_load, axis=0) / tokens
    mean_probability = jnp.sum(stats.expert_probs, axis=0) / tokens
    return stats.expert_load.shape[-1] * jnp.sum(routed_fraction * mean_probability)


def router_z_loss(stats: RouterStats) -> jax.Array:
    """Mean over real tokens and MoE layers of logsumexp(router logits)^2 (ST-MoE's z-loss)."""
    return jnp.sum(stats.z) / jnp.maximum(jnp.sum(stats.tokens), 1.0)


@dataclasses.dataclass(frozen=True)
class MoECrossEntropy:
    """CrossEntropy + aux_loss_coef * load-balancing loss (+ router_z_weight * router z-loss).

    moe_layers names the decoder layers of the per-layer expert-load metrics; micro_batches is
    the step's gradient accumulation (each micro-batch's aux weighs 1 / micro_batches).
    """

    moe_layers: tuple[int, ...]
    aux_loss_coef: float
    router_z_weight: float = 0.0
    z_loss_weight: float = 0.0
    loss_chunk_size: int = 512
    micro_batches: int = 1

    def sums(self, model: CausalLM, batch: dict[str, jax.Array], dropout_key=None) -> MoESums:
        hidden_BxTxD, stats = model.forward(
            batch["input_ids"], batch["positions"], batch["segment_ids"], dropout_key
        )
        ce = hidden_loss_sums(model, hidden_BxTxD, batch, self.loss_chunk_size)
        return MoESums(
            *ce,
            expert_load=stats.expert_load,
            router_tokens=stats.tokens,
            aux=load_balancing_loss(stats),
            router_z=router_z_loss(stats),
            micro_batches=jnp.ones((), jnp.float32),
        )

    def normalizer(self, batch: dict[str, jax.Array]) -> jax.Array:
        return self._cross_entropy().normalizer(batch)

    def loss(self, sums: MoESums, normalizer: jax.Array) -> jax.Array:
        router = self.aux_loss_coef * sums.aux + self.router_z_weight * sums.router_z
        return self._cross_entropy().loss(sums, normalizer) + router / self.micro_batches

    def metrics(self, sums: MoESums, normalizer: jax.Array) -> dict[str, Any]:
        ce = sums.nll / normalizer
        aux = sums.aux / sums.micro_batches
        metrics = {
            "train/loss": ce + self.aux_loss_coef * aux,
            "train/ce": ce,
            "train/aux_loss": aux,
            "train/router_z_loss": sums.router_z / sums.micro_batches,
            "train/z_loss": sums.z / normalizer,
            "train/target_tokens": sums.target_tokens,
        }
        # max / mean tokens per expert: 1 is perfectly even, X means one expert takes all.
        max_over_mean = jnp.max(sums.expert_load, -1) / jnp.maximum(
            jnp.mean(sums.expert_load, -1), 1
        )
        for position, layer in enumerate(self.moe_layers):
            metrics[f"train/expert_load_max_over_mean/layer_{layer:02d}"] = max_over_mean[position]
        return metrics

    def eval_metrics(self, sums: MoESums) -> dict[str, float]:
        """Over the whole eval set: the cross-entropy part, as CrossEntropy reports it."""
        return self._cross_entropy().eval_metrics(LossSums(sums.nll, sums.z, sums.target_tokens))

    def _cross_entropy(self) -> CrossEntropy:
        return CrossEntropy(self.z_loss_weight, self.loss_chunk_size)
