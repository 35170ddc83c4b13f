"""The GRPO family of online RL losses, with TRL 1.16's names and definitions
(trl/trainer/grpo_trainer.py: `_compute_loss`, and the advantages of
`_generate_and_score_completions`).

A batch holds one sampled sequence per row: its prompt and completion, `target_mask` on the
completion's tokens. Beside the base keys it carries, per token, the log-probs of the policy
that sampled it (`old_logps`: the importance ratio's denominator) and, with a KL term, the
reference's (`reference_logps`); per row, the completion's advantage.

Per completion token t of sequence i, with r = exp(log p(t) - old log p(t)) (token level) or
the exponential of the sequence's mean log-ratio (sequence level, GSPO):

  grpo, bnpo, dr_grpo, dapo   -min(r A_i, clip(r, 1 - epsilon, 1 + epsilon_high) A_i),
                              r first capped at delta where delta > 0 (two-sided clipping)
  cispo                       -stop_gradient(min(r, epsilon_high)) A_i log p(t)

each first weighted by the sampler-mismatch correction where it is on
(objectives/grpo_sampling.py), plus beta * (exp(ref - logp) - (ref - logp) - 1), the k3
estimate of KL(policy || reference).
The token losses are reduced as TRL does:

  dapo, cispo   sum over the batch's completion tokens / their count (the whole batch's)
  grpo          mean over each micro-batch's sequences of the sequence's token mean
  bnpo          each micro-batch's token mean
  dr_grpo       each micro-batch's token sum / (its rows x max_completion_length)

the last three divided by the micro-batches of the step (gradient accumulation), as TRL
divides each micro-batch's loss by its accumulation steps.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sft_jax.adapters.lora import adapters_off
from sft_jax.core.batch import REFERENCE_KEY, ROW, TOKEN, Field, register
from sft_jax.core.errors import ConfigError, check_choice
from sft_jax.models.decoder import CausalLM
from sft_jax.objectives import grpo_sampling
from sft_jax.objectives.loss import hidden_token_entropy, hidden_token_logps, token_logps

LOSS_TYPES = ("dapo", "grpo", "dr_grpo", "bnpo", "cispo")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
SCALE_REWARDS = ("group", "batch", "none")

OLD_LOGPS_KEY = register(
    "old_logps",
    Field(np.float32, TOKEN, "log p(target_ids[t]) under the policy that sampled it; 0 off mask"),
)
ADVANTAGE_KEY = register("advantages", Field(np.float32, ROW, "the row's completion's advantage"))


@dataclasses.dataclass(frozen=True)
class GRPOSpec:
    loss_type: str = "dapo"
    importance_sampling_level: str = "token"
    epsilon: float = 0.2  # TRL's epsilon (the low clip; also the high one where unset)
    epsilon_high: float | None = None
    delta: float = 0.0  # two-sided clipping: the ratio's cap (0: off; TRL's None)
    beta: float = 0.0  # weight of the k3 KL estimate against the reference
    max_completion_length: int = 256  # dr_grpo's constant normaliser
    accumulation: int = 1  # micro-batches per step (grpo, bnpo, dr_grpo divide by it)
    # The batch carries grpo_sampling's importance weights; each token's policy loss times its.
    importance_sampling_correction: bool = False

    def __post_init__(self) -> None:
        check_choice("grpo.loss_type", self.loss_type, LOSS_TYPES)
        check_choice(
            "grpo.importance_sampling_level",
            self.importance_sampling_level,
            IMPORTANCE_SAMPLING_LEVELS,
        )

    @property
    def high(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high


class RolloutFields(NamedTuple):
    """What an online-RL objective adds to a rollout's rows (rollout_fields): arrays by batch
    key, each completion's advantage (for completions.jsonl: a token mean where advantages are
    per token) and host metrics (TRL's names, without train/)."""

    fields: dict[str, np.ndarray]
    advantages: np.ndarray
    metrics: dict[str, float]


class GRPOSums(NamedTuple):
    """Sums of one micro-batch; they add up over micro-batches."""

    policy: jax.Array  # the loss's numerator (see the module docstring)
    tokens: jax.Array  # completion tokens
    kl: jax.Array  # sum of the k3 estimate over completion tokens
    clipped_low: jax.Array  # ratio below 1 - epsilon with a negative advantage (count)
    clipped_high: jax.Array  # ratio above 1 + epsilon_high with a positive advantage
    clipped_region: jax.Array
    weight: jax.Array  # tokens (token level) or sequences (sequence level) the clip counts


def per_token_loss(
    spec: GRPOSpec,
    logps_BxT: jax.Array,
    old_logps_BxT: jax.Array,
    advantages_B: jax.Array,
    mask_BxT: jax.Array,
    reference_logps_BxT: jax.Array | None = None,
    correction_BxT: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """(per-token loss [B, T], the k3 KL [B, T] (zeros without beta), clip indicators [B, T]
    or [B, 1]) of the module docstring; the loss is not yet masked. correction_BxT: the
    sampler-mismatch weights (None: no correction)."""
    mask = mask_BxT.astype(jnp.float32)
    log_ratio = logps_BxT - old_logps_BxT
    if spec.importance_sampling_level == "token":
        log_weights = log_ratio
    else:
        log_weights = jnp.sum(log_ratio * mask, -1, keepdims=True) / jnp.maximum(
            jnp.sum(mask, -1, keepdims=True), 1.0
        )
    ratio = jnp.exp(log_weights)
    advantages = advantages_B[:, None].astype(jnp.float32)
    if spec.loss_type == "cispo":
        capped = jax.lax.stop_gradient(jnp.minimum(ratio, spec.high))
        loss = -capped * advantages * logps_BxT
        clipped = {"high": (ratio > spec.high) & (advantages > 0)}
        clipped |= {"low": jnp.zeros_like(clipped["high"]), "region": clipped["high"]}
    else:
        clipped_ratio = jnp.clip(ratio, 1 - spec.epsilon, 1 + spec.high)
        capped = jnp.minimum(ratio, spec.delta) if spec.delta > 0 else ratio
        loss = -jnp.minimum(capped * advantages, clipped_ratio * advantages)
        low = (ratio < 1 - spec.epsilon) & (advantages < 0)
        high = (ratio > 1 + spec.high) & (advantages > 0)
        clipped = {"low": low, "high": high, "region": low | high}
    if correction_BxT is not None:
        loss = loss * correction_BxT
    kl = jnp.zeros_like(logps_BxT)
    if spec.beta != 0.0:
        if reference_logps_BxT is None:
            raise ValueError("beta != 0 needs the reference's log-probs")
        delta_ref = reference_logps_BxT - logps_BxT
        kl = jnp.exp(delta_ref) - delta_ref - 1
        loss = loss + spec.beta * kl
    return loss, kl, clipped


def reduce_loss(spec: GRPOSpec, loss_BxT: jax.Array, mask_BxT: jax.Array) -> jax.Array:
    """One micro-batch's numerator of the loss (the module docstring's reductions)."""
    mask = mask_BxT.astype(jnp.float32)
    masked = loss_BxT * mask
    if spec.loss_type in ("dapo", "cispo"):
        return jnp.sum(masked)
    if spec.loss_type == "grpo":
        per_sequence = jnp.sum(masked, -1) / jnp.maximum(jnp.sum(mask, -1), 1.0)
        return jnp.mean(per_sequence)
    if spec.loss_type == "bnpo":
        return jnp.sum(masked) / jnp.maximum(jnp.sum(mask), 1.0)
    return jnp.sum(masked) / (mask.shape[0] * spec.max_completion_length)  # dr_grpo


@dataclasses.dataclass(frozen=True)
class GRPOObjective:
    """The train step's objective (train/step.Objective) for a GRPO-family loss.

    temperature: the sampler's; log-probs are of softmax(logits / temperature), as TRL's.
    reference: where the KL term's reference log-probs come from, computed once per rollout
    (rollout_logps) and read from the batch: "none" (beta 0), "adapters_off" (LoRA: the same
    weights with the adapters off) or "copy" (full fine-tuning: model.reference, a frozen copy
    of the initial weights, preference.attach_frozen_copy)."""

    spec: GRPOSpec
    loss_chunk_size: int = 512
    temperature: float = 1.0
    reference: str = "none"
    num_generations: int = 2  # completions per prompt: the groups of the advantages
    scale_rewards: str = "group"

    @property
    def batch_keys(self) -> tuple[str, ...]:
        keys = (OLD_LOGPS_KEY, ADVANTAGE_KEY)
        if self.spec.importance_sampling_correction:
            keys = (*keys, grpo_sampling.IS_RATIO_KEY)
        return (*keys, REFERENCE_KEY) if self.spec.beta != 0.0 else keys

    def token_logps(self, model: CausalLM, batch: dict[str, jax.Array], dropout_key=None):
        """log p(target) [B, T] of softmax(logits / temperature), chunked (no [B, T, V])."""
        return token_logps(model, batch, self.loss_chunk_size, dropout_key, self.temperature)

    def rollout_logps(
        self, model: CausalLM, batch: dict[str, jax.Array]
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(the policy's log-probs, the reference's, the policy's entropy) [B, T] of a
        rollout's tokens, 0 off the completions: the ratio's denominator (and the numerics
        gate's training side), the KL term's reference (zeros without one), TRL's `entropy`."""
        mask = batch["target_mask"]
        hidden_BxTxD, _ = model.forward(
            batch["input_ids"], batch["positions"], batch["segment_ids"]
        )
        chunk, temperature = self.loss_chunk_size, self.temperature
        policy = hidden_token_logps(model, hidden_BxTxD, batch, chunk, temperature)
        entropy = hidden_token_entropy(model, hidden_BxTxD, chunk, temperature)
        if self.reference == "none":
            reference = jnp.zeros_like(policy)
        elif self.reference == "copy":
            reference = self.token_logps(model.reference, batch)
        else:
            with adapters_off(model):
                reference = self.token_logps(model, batch)
        return tuple(jnp.where(mask, x, 0.0) for x in (policy, reference, entropy))

    def rollout_fields(
        self, table: np.ndarray, weights: np.ndarray, mask: np.ndarray, outputs: tuple
    ) -> RolloutFields:
        """The rows' old log-probs, advantages (and reference log-probs with beta) from the
        rewards [N, F] of a rollout's N completions and rollout_logps' outputs."""
        g = self.num_generations
        per_completion, total, zero_std = advantages(table, weights, g, self.scale_rewards)
        fields = {OLD_LOGPS_KEY: outputs[0], ADVANTAGE_KEY: per_completion.astype(np.float32)}
        if self.spec.beta != 0.0:
            fields[REFERENCE_KEY] = outputs[1]
        std = reward_std(total, g, self.scale_rewards)
        metrics = {"frac_reward_zero_std": float(np.mean(zero_std))}
        if not np.all(np.isnan(std)):
            metrics["reward_std"] = float(np.nanmean(std))
        return RolloutFields(fields, per_completion, metrics)

    def sums(self, model: CausalLM, batch: dict[str, jax.Array], dropout_key=None) -> GRPOSums:
        return self.sums_of_logps(self.token_logps(model, batch, dropout_key), batch)

    def sums_with_router(
        self, model: CausalLM, batch: dict[str, jax.Array], dropout_key=None
    ) -> tuple[GRPOSums, Any]:
        """sums, and the router statistics of the forward pass (a mixture of experts:
        objectives/moe.RouterLosses adds the router's losses)."""
        hidden_BxTxD, stats = model.forward(
            batch["input_ids"], batch["positions"], batch["segment_ids"], dropout_key
        )
        logps_BxT = hidden_token_logps(
            model, hidden_BxTxD, batch, self.loss_chunk_size, self.temperature
        )
        return self.sums_of_logps(logps_BxT, batch), stats

    def sums_of_logps(self, logps_BxT: jax.Array, batch: dict[str, jax.Array]) -> GRPOSums:
        mask = batch["target_mask"]
        loss, kl, clipped = per_token_loss(
            self.spec,
            logps_BxT,
            batch[OLD_LOGPS_KEY],
            batch[ADVANTAGE_KEY],
            mask,
            batch.get(REFERENCE_KEY),
            batch.get(grpo_sampling.IS_RATIO_KEY),
        )
        weights = mask.astype(jnp.float32)
        if clipped["region"].shape[-1] == 1:  # sequence level: one ratio per sequence
            weights = (jnp.sum(weights, -1, keepdims=True) > 0).astype(jnp.float32)
        count = {k: jnp.sum(v.astype(jnp.float32) * weights) for k, v in clipped.items()}
        return GRPOSums(
            policy=reduce_loss(self.spec, loss, mask),
            tokens=jnp.sum(mask.astype(jnp.float32)),
            kl=jnp.sum(kl * mask),
            clipped_low=count["low"],
            clipped_high=count["high"],
            clipped_region=count["region"],
            weight=jnp.sum(weights),
        )

    def normalizer(self, batch: dict[str, jax.Array]) -> jax.Array:
        if self.spec.loss_type in ("dapo", "cispo"):
            return jnp.maximum(jnp.sum(batch["target_mask"].astype(jnp.float32)), 1.0)
        return jnp.asarray(float(self.spec.accumulation))

    def loss(self, sums: GRPOSums, normalizer: jax.Array) -> jax.Array:
        return sums.policy / normalizer

    def metrics(self, sums: GRPOSums, normalizer: jax.Array) -> dict[str, Any]:
        weight = jnp.maximum(sums.weight, 1.0)
        return {
            "train/loss": self.loss(sums, normalizer),
            "train/kl": sums.kl / jnp.maximum(sums.tokens, 1.0),
            "train/clip_ratio/low_mean": sums.clipped_low / weight,
            "train/clip_ratio/high_mean": sums.clipped_high / weight,
            "train/clip_ratio/region_mean": sums.clipped_region / weight,
            "train/completion_tokens": sums.tokens,
        }

    def eval_metrics(self, sums: GRPOSums) -> dict[str, float]:
        raise NotImplementedError("GRPO evaluates by sampling (mean reward, pass@k), not a loss")


# --- advantages (on the host, from the rewards of a step's completions) ----------------------


def nanstd(x: np.ndarray, axis: int | None = None) -> np.ndarray:
    """The standard deviation ignoring NaNs, with Bessel's correction (NaN below 2 values)."""
    count = np.sum(~np.isnan(x), axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.nanmean(x, axis=axis, keepdims=True)
        variance = np.nansum((x - mean) ** 2, axis=axis) / (count - 1)
    return np.where(count > 1, np.sqrt(variance), np.nan)


def advantages(
    rewards: np.ndarray, weights: np.ndarray, num_generations: int, scale_rewards: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(advantages [N], total rewards [N], whether each one's std is zero [N]) of N = prompts x
    num_generations completions, grouped by prompt (rows i*G .. i*G+G-1), from rewards [N, F]
    of F reward functions (NaN: the function does not apply) and their weights [F]; TRL's
    "sum_then_normalize". A completion no function scores gets advantage 0."""
    check_choice("grpo.scale_rewards", scale_rewards, SCALE_REWARDS)
    if num_generations < 2:
        raise ConfigError(
            f"grpo.num_generations={num_generations}: a group of one completion is its own "
            "baseline (every advantage would be 0) and has no std to scale by; sample at least "
            "2 completions per prompt."
        )
    total = total_rewards(rewards, weights)
    with np.errstate(invalid="ignore"):
        mean = np.repeat(np.nanmean(total.reshape(-1, num_generations), axis=1), num_generations)
    std = reward_std(total, num_generations, scale_rewards)
    result = total - mean
    if scale_rewards != "none":
        result = result / (std + 1e-4)
    zero_std = np.isclose(std, 0.0)  # NaN (a group of one scored completion): not zero
    return np.nan_to_num(result, nan=0.0), total, zero_std


def total_rewards(rewards: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """[N] weighted sums of rewards [N, F] over the functions that apply (NaN where none)."""
    rewards = np.asarray(rewards, np.float64)
    total = np.nansum(rewards * np.asarray(weights, np.float64)[None, :], axis=1)
    total[np.all(np.isnan(rewards), axis=1)] = np.nan
    return total


def reward_std(total: np.ndarray, num_generations: int, scale_rewards: str) -> np.ndarray:
    """[N] the std each total reward is scaled by: its group's ("group", and "none", where it
    only says which groups are flat: TRL's reward_std) or the whole batch's ("batch")."""
    if scale_rewards == "batch":
        return np.full_like(total, nanstd(total) if total.size > 1 else 0.0)
    return np.repeat(nanstd(total.reshape(-1, num_generations), axis=1), num_generations)
