"""Classic RLHF's PPO (Schulman et al. 2017, with GAE: Schulman et al. 2016), in the form TRL's
and Tunix's PPO trainers use for language models: the building blocks of a PPO run.

Per completion token t of sequence i (mask: the completion's tokens), with the reward model's
score s_i of the whole completion and the log-probs of the policy that sampled it (logp) and of
the reference (ref):

  reward   r_t = -kl_coef * (logp_t - ref_t)          the KL penalty, per token (k1)
               + s_i at the completion's last token     the score, once
  GAE      delta_t = r_t + gamma * V_{t+1} - V_t        V past the last token: 0 (the episode ends)
           A_t = delta_t + gamma * lam * A_{t+1}
  returns  R_t = A_t + V_t; the advantages are then whitened over the batch's completion tokens
           ((A - mean) / sqrt(var + 1e-8), var with Bessel's correction)
  policy   pg = mean_t max(-A_t ratio_t, -A_t clip(ratio_t, 1 - cliprange, 1 + cliprange)),
           ratio_t = exp(logp_t - old_logp_t)
  value    vf = 0.5 mean_t max((v_t - R_t)^2, (old_v_t + clip(v_t - old_v_t, +-cliprange_value)
           - R_t)^2)
  loss     pg + vf_coef * vf

means over the batch's completion tokens. TRL 0.x's PPOTrainer bootstraps the last token's
delta from the value one position past the completion; here the episode ends at the last token,
as the published formula has it. The run's objective is objectives/ppo_run.py.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class PPOSpec:
    gamma: float = 1.0
    lam: float = 0.95
    kl_coef: float = 0.05
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    mask = mask.astype(x.dtype)
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def whiten(x: jax.Array, mask: jax.Array) -> jax.Array:
    """(x - mean) / sqrt(var + 1e-8) over the masked entries (var with Bessel's correction);
    0 off the mask."""
    mean = masked_mean(x, mask)
    count = jnp.sum(mask.astype(x.dtype))
    var = masked_mean(jnp.square(x - mean), mask) * count / jnp.maximum(count - 1, 1.0)
    return jnp.where(mask, (x - mean) * jax.lax.rsqrt(var + 1e-8), 0.0)


def token_rewards(
    spec: PPOSpec,
    scores_B: jax.Array,
    logps_BxT: jax.Array,
    ref_logps_BxT: jax.Array,
    mask_BxT: jax.Array,
) -> jax.Array:
    """r_t of the module docstring [B, T], 0 off the mask."""
    rewards = -spec.kl_coef * (logps_BxT - ref_logps_BxT)
    positions_T = jnp.arange(mask_BxT.shape[1])
    last_B = jnp.max(jnp.where(mask_BxT, positions_T[None, :], -1), axis=1)
    at_last = positions_T[None, :] == last_B[:, None]
    rewards = rewards + jnp.where(at_last, scores_B[:, None], 0.0)
    return jnp.where(mask_BxT, rewards, 0.0)


def gae(
    spec: PPOSpec, rewards_BxT: jax.Array, values_BxT: jax.Array, mask_BxT: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """(advantages before whitening, returns) [B, T] by the module docstring's recursion, run
    backwards over time; 0 off the mask (a token past the completion has value 0)."""
    values_BxT = jnp.where(mask_BxT, values_BxT, 0.0)
    rewards_BxT = jnp.where(mask_BxT, rewards_BxT, 0.0)
    next_values_BxT = jnp.concatenate(
        [values_BxT[:, 1:], jnp.zeros_like(values_BxT[:, :1])], axis=1
    )
    deltas_BxT = rewards_BxT + spec.gamma * next_values_BxT - values_BxT

    def step(later_B: jax.Array, xs: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        delta_B, inside_B = xs
        advantage_B = jnp.where(inside_B, delta_B + spec.gamma * spec.lam * later_B, 0.0)
        return advantage_B, advantage_B

    _, advantages_TxB = jax.lax.scan(
        step, jnp.zeros(deltas_BxT.shape[0]), (deltas_BxT.T, mask_BxT.T), reverse=True
    )
    advantages_BxT = advantages_TxB.T
    return advantages_BxT, jnp.where(mask_BxT, advantages_BxT + values_BxT, 0.0)


class TokenTerms(NamedTuple):
    """Per completion token [B, T]: the module docstring's policy and value terms (before their
    means), and whether the clip decided each."""

    policy: jax.Array
    value: jax.Array
    clipped: jax.Array
    value_clipped: jax.Array


def token_terms(
    spec: PPOSpec,
    logps_BxT: jax.Array,
    old_logps_BxT: jax.Array,
    advantages_BxT: jax.Array,
    values_BxT: jax.Array,
    old_values_BxT: jax.Array,
    returns_BxT: jax.Array,
) -> TokenTerms:
    ratio = jnp.exp(logps_BxT - old_logps_BxT)
    pg_unclipped = -advantages_BxT * ratio
    pg_clipped = -advantages_BxT * jnp.clip(ratio, 1 - spec.cliprange, 1 + spec.cliprange)
    clipped_values = old_values_BxT + jnp.clip(
        values_BxT - old_values_BxT, -spec.cliprange_value, spec.cliprange_value
    )
    vf_unclipped = jnp.square(values_BxT - returns_BxT)
    vf_clipped = jnp.square(clipped_values - returns_BxT)
    return TokenTerms(
        policy=jnp.maximum(pg_unclipped, pg_clipped),
        value=0.5 * jnp.maximum(vf_unclipped, vf_clipped),
        clipped=pg_clipped > pg_unclipped,
        value_clipped=vf_clipped > vf_unclipped,
    )


class PPOLosses(NamedTuple):
    loss: jax.Array
    policy: jax.Array  # pg
    value: jax.Array  # vf (before vf_coef)
    clip_fraction: jax.Array  # tokens whose ratio's clip decided the policy term
    value_clip_fraction: jax.Array


def losses(
    spec: PPOSpec,
    logps_BxT: jax.Array,
    old_logps_BxT: jax.Array,
    advantages_BxT: jax.Array,
    values_BxT: jax.Array,
    old_values_BxT: jax.Array,
    returns_BxT: jax.Array,
    mask_BxT: jax.Array,
) -> PPOLosses:
    """The module docstring's loss of one batch (advantages already whitened)."""
    terms = token_terms(
        spec, logps_BxT, old_logps_BxT, advantages_BxT, values_BxT, old_values_BxT, returns_BxT
    )
    policy = masked_mean(terms.policy, mask_BxT)
    value = masked_mean(terms.value, mask_BxT)
    return PPOLosses(
        loss=policy + spec.vf_coef * value,
        policy=policy,
        value=value,
        clip_fraction=masked_mean(terms.clipped.astype(jnp.float32), mask_BxT),
        value_clip_fraction=masked_mean(terms.value_clipped.astype(jnp.float32), mask_BxT),
    )
