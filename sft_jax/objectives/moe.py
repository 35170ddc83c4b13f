"""The router's losses of a mixture of experts, added to any objective: the load-balancing loss
of transformers' load_balancing_loss_func (and an optional router z-loss), over real tokens.

An objective reports the router statistics of its policy's forward pass
(`sums_with_router(model, batch, dropout_key) -> (its sums, RouterStats or None)`); RouterLosses
wraps it, adds the losses and the expert-load metrics, and leaves the rest to it. The step
builds SFT, preference and reward-model objectives this way (train/step.py, train/setup.py).

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


class RouterSums(NamedTuple):
    """The wrapped objective's sums and the router's, per batch (additive over micro-batches)."""

    inner: Any
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
class RouterLosses:
    """inner's loss + aux_loss_coef * load-balancing loss (+ router_z_weight * router z-loss),
    each micro-batch's weighing 1 / micro_batches (the step's gradient accumulation).

    moe_layers names the decoder layers of the per-layer expert-load metrics. The metrics are
    inner's, with "train/loss" including the load-balancing term and inner's own loss also
    under "train/<inner.loss_metric>" where it names one (SFT: "train/ce").
    """

    inner: Any
    moe_layers: tuple[int, ...]
    aux_loss_coef: float
    router_z_weight: float = 0.0
    micro_batches: int = 1

    def __getattr__(self, name: str) -> Any:  # batch_keys, reference, reference_forwards, ...
        if name.startswith("__") or name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def sums(self, model: CausalLM, batch: dict[str, jax.Array], dropout_key=None) -> RouterSums:
        inner, stats = self.inner.sums_with_router(model, batch, dropout_key)
        return RouterSums(
            inner,
            expert_load=stats.expert_load,
            router_tokens=stats.tokens,
            aux=load_balancing_loss(stats),
            router_z=router_z_loss(stats),
            micro_batches=jnp.ones((), jnp.float32),
        )

    def no_sums(self, zeros: RouterSums) -> RouterSums:
        own = getattr(self.inner, "no_sums", None)
        return zeros if own is None else zeros._replace(inner=own(zeros.inner))

    def add_sums(self, a: RouterSums, b: RouterSums, add: Any = jnp.add) -> RouterSums:
        own = getattr(self.inner, "add_sums", None)
        added = jax.tree.map(add, a._replace(inner=None), b._replace(inner=None))
        inner = own(a.inner, b.inner) if own else jax.tree.map(add, a.inner, b.inner)
        return added._replace(inner=inner)

    def normalizer(self, batch: dict[str, jax.Array]) -> Any:
        return self.inner.normalizer(batch)

    def loss(self, sums: RouterSums, normalizer: Any) -> jax.Array:
        router = self.aux_loss_coef * sums.aux + self.router_z_weight * sums.router_z
        return self.inner.loss(sums.inner, normalizer) + router / self.micro_batches

    def metrics(self, sums: RouterSums, normalizer: Any) -> dict[str, Any]:
        metrics = dict(self.inner.metrics(sums.inner, normalizer))
        aux = sums.aux / sums.micro_batches
        own = getattr(self.inner, "loss_metric", None)
        if own:
            metrics[f"train/{own}"] = metrics["train/loss"]
        metrics["train/loss"] = metrics["train/loss"] + self.aux_loss_coef * aux
        metrics["train/aux_loss"] = aux
        metrics["train/router_z_loss"] = sums.router_z / sums.micro_batches
        # max / mean tokens per expert: 1 is perfectly even, X means one expert takes all.
        max_over_mean = jnp.max(sums.expert_load, -1) / jnp.maximum(
            jnp.mean(sums.expert_load, -1), 1
        )
        for position, layer in enumerate(self.moe_layers):
            metrics[f"train/expert_load_max_over_mean/layer_{layer:02d}"] = max_over_mean[position]
        return metrics

    def eval_metrics(self, sums: RouterSums) -> dict[str, float]:
        """Over the whole eval set: the wrapped objective's (the router's losses are not
        reported at eval)."""
        return self.inner.eval_metrics(sums.inner)
