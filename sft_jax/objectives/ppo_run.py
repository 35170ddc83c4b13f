"""Classic RLHF's PPO as a run (config.train.objective = "ppo"): the math of objectives/ppo.py
on online RL's rollouts (loop/rollouts.py samples, scores and lays them out as for GRPO, with
config.grpo's sampling, rewards, num_iterations and gate), with a value head on the policy's
trunk (models/value_head.py) or a reward model's export (config.ppo.value_model) as the critic.

Per rollout, on the host: the policy's log-probs, the reference's and the values of its tokens
(rollout_logps, one forward), the rewards' weighted sum as each completion's score (a reward
model's export as `reward_model:DIR` is the classic recipe), the KL penalty folded into the
per-token rewards, GAE, whitened advantages and returns (rollout_fields). Per update: the
clipped policy loss and the clipped value loss over the batch's completion tokens (sums over
micro-batches, divided by the batch's completion tokens)."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sft_jax.adapters.lora import adapters_off
from sft_jax.core.batch import TOKEN, Field, register
from sft_jax.core.errors import need
from sft_jax.core.spec import RunSpec
from sft_jax.models import from_pretrained, value_head
from sft_jax.models.config import DTYPES
from sft_jax.models.decoder import CausalLM
from sft_jax.objectives import grpo, grpo_config, model_reward, ppo
from sft_jax.objectives.loss import hidden_token_entropy, hidden_token_logps, token_logps

ADVANTAGES_KEY = register(
    "token_advantages",
    Field(np.float32, TOKEN, "PPO: a completion token's whitened GAE advantage; 0 off"),
)
RETURNS_KEY = register(
    "returns", Field(np.float32, TOKEN, "PPO: a completion token's return (the value target)")
)
OLD_VALUES_KEY = register(
    "old_values", Field(np.float32, TOKEN, "PPO: the value head's estimate at sampling time")
)


class PPOSums(NamedTuple):
    """Sums over a micro-batch's completion tokens; they add up over micro-batches."""

    policy: jax.Array
    value: jax.Array
    tokens: jax.Array
    clipped: jax.Array
    value_clipped: jax.Array
    values: jax.Array  # of the value head's estimates (their mean is logged)


@dataclasses.dataclass(frozen=True)
class PPOObjective:
    """The train step's objective (train/step.Objective) for PPO; reference as GRPO's
    (objectives/grpo.GRPOObjective): "none" (kl_coef 0), "adapters_off" or "copy"."""

    spec: ppo.PPOSpec
    loss_chunk_size: int = 512
    temperature: float = 1.0
    reference: str = "copy"

    batch_keys = (grpo.OLD_LOGPS_KEY, ADVANTAGES_KEY, RETURNS_KEY, OLD_VALUES_KEY)

    def rollout_logps(self, model: CausalLM, batch: dict[str, jax.Array]) -> tuple:
        """(the policy's log-probs, the reference's, the entropy, the values) [B, T] of a
        rollout's tokens, 0 off the completions."""
        hidden_BxTxD, _ = model.forward(
            batch["input_ids"], batch["positions"], batch["segment_ids"]
        )
        chunk, temperature = self.loss_chunk_size, self.temperature
        policy = hidden_token_logps(model, hidden_BxTxD, batch, chunk, temperature)
        entropy = hidden_token_entropy(model, hidden_BxTxD, chunk, temperature)
        values = value_head.values(model, hidden_BxTxD, batch)
        if self.reference == "none":
            reference = jnp.zeros_like(policy)
        elif self.reference == "copy":
            reference = token_logps(model.reference, batch, chunk, None, temperature)
        else:
            with adapters_off(model):
                reference = token_logps(model, batch, chunk, None, temperature)
        mask = batch["target_mask"]
        return tuple(jnp.where(mask, x, 0.0) for x in (policy, reference, entropy, values))

    def rollout_fields(
        self, table: np.ndarray, weights: np.ndarray, mask: np.ndarray, outputs: tuple
    ) -> grpo.RolloutFields:
        """Scores (the rewards' weighted sum; 0 where no function applies), per-token rewards
        with the KL penalty, GAE advantages (whitened) and returns: ppo.py's formulas."""
        policy, reference, _, values = (np.asarray(x, np.float32) for x in outputs)
        scores = np.nan_to_num(grpo.total_rewards(table, weights), nan=0.0).astype(np.float32)
        rewards = ppo.token_rewards(self.spec, scores, policy, reference, mask)
        advantages, returns = ppo.gae(self.spec, rewards, values, mask)
        whitened = np.asarray(ppo.whiten(advantages, mask), np.float32)
        fields = {
            grpo.OLD_LOGPS_KEY: policy,
            ADVANTAGES_KEY: whitened,
            RETURNS_KEY: np.asarray(returns, np.float32),
            OLD_VALUES_KEY: values,
        }
        tokens = np.maximum(mask.sum(-1), 1)
        kl = np.where(mask, policy - reference, 0.0).sum(-1)
        non_score = -self.spec.kl_coef * kl
        metrics = {  # TRL's PPOTrainer's names
            "objective/kl": float(kl.mean()),
            "objective/non_score_reward": float(non_score.mean()),
            "objective/rlhf_reward": float((scores + non_score).mean()),
            "objective/scores": float(scores.mean()),
            "val/mean": float(values[mask].mean()) if mask.any() else 0.0,
        }
        return grpo.RolloutFields(fields, whitened.sum(-1) / tokens, metrics)

    def sums_with_router(
        self, model: CausalLM, batch: dict[str, jax.Array], dropout_key=None
    ) -> tuple[PPOSums, Any]:
        hidden_BxTxD, stats = model.forward(
            batch["input_ids"], batch["positions"], batch["segment_ids"], dropout_key
        )
        logps = hidden_token_logps(
            model, hidden_BxTxD, batch, self.loss_chunk_size, self.temperature
        )
        values = value_head.values(model, hidden_BxTxD, batch)
        terms = ppo.token_terms(
            self.spec,
            logps,
            batch[grpo.OLD_LOGPS_KEY],
            batch[ADVANTAGES_KEY],
            values,
            batch[OLD_VALUES_KEY],
            batch[RETURNS_KEY],
        )
        mask = batch["target_mask"].astype(jnp.float32)
        sums = PPOSums(
            policy=jnp.sum(terms.policy * mask),
            value=jnp.sum(terms.value * mask),
            tokens=jnp.sum(mask),
            clipped=jnp.sum(terms.clipped * mask),
            value_clipped=jnp.sum(terms.value_clipped * mask),
            values=jnp.sum(values * mask),
        )
        return sums, stats

    def sums(self, model: CausalLM, batch: dict[str, jax.Array], dropout_key=None) -> PPOSums:
        return self.sums_with_router(model, batch, dropout_key)[0]

    def normalizer(self, batch: dict[str, jax.Array]) -> jax.Array:
        return jnp.maximum(jnp.sum(batch["target_mask"].astype(jnp.float32)), 1.0)

    def loss(self, sums: PPOSums, normalizer: jax.Array) -> jax.Array:
        return (sums.policy + self.spec.vf_coef * sums.value) / normalizer

    def metrics(self, sums: PPOSums, normalizer: jax.Array) -> dict[str, Any]:
        tokens = jnp.maximum(sums.tokens, 1.0)
        return {
            "train/loss": self.loss(sums, normalizer),
            "train/loss/policy_avg": sums.policy / tokens,
            "train/loss/value_avg": sums.value / tokens,
            "train/policy/clipfrac_avg": sums.clipped / tokens,
            "train/val/clipfrac_avg": sums.value_clipped / tokens,
            "train/val/vpred": sums.values / tokens,
            "train/completion_tokens": sums.tokens,
        }

    def eval_metrics(self, sums: PPOSums) -> dict[str, float]:
        raise NotImplementedError("PPO evaluates by sampling (mean reward, pass@k), not a loss")


def objective_from_config(config: RunSpec) -> PPOObjective:
    section = config.ppo
    spec = ppo.PPOSpec(
        gamma=section.gamma,
        lam=section.lam,
        kl_coef=section.kl_coef,
        cliprange=section.cliprange,
        cliprange_value=section.cliprange_value,
        vf_coef=section.vf_coef,
    )
    reference = grpo_config.reference_of(config, section.kl_coef)
    return PPOObjective(spec, config.train.loss_chunk_size, config.grpo.temperature, reference)


def check_config(config: RunSpec) -> None:
    """config.ppo, and online RL's config.grpo (grpo_config.check_rollouts)."""
    section = config.ppo
    for field in ("gamma", "lam"):
        need(config, 0 <= getattr(section, field) <= 1, f"ppo.{field}", "must be within [0, 1].")
    for field in ("cliprange", "cliprange_value"):
        need(config, getattr(section, field) > 0, f"ppo.{field}", "must be positive.")
    need(config, section.kl_coef >= 0, "ppo.kl_coef", "0 (no KL penalty) or positive.")
    need(config, section.vf_coef > 0, "ppo.vf_coef", "must be positive (the critic learns).")
    reference = grpo_config.reference_of(config, section.kl_coef)
    grpo_config.check_rollouts(config, reference, "ppo.kl_coef > 0")
    if critic_dir(config):
        model_reward.check(critic_dir(config))


@contextlib.contextmanager
def critic_set_aside(model: CausalLM) -> Iterator[None]:
    """The model without its critic (value head or critic model) inside the block."""
    held = {name: vars(model)[name] for name in ("value_head", "critic") if name in vars(model)}
    for name in held:
        delattr(model, name)
    try:
        yield
    finally:
        for name, module in held.items():
            setattr(model, name, module)


def critic_dir(config: RunSpec) -> str:
    """The reward model export the critic starts from ("" for a value head on the trunk):
    config.ppo.value_model, where "reward_model" names grpo.reward_funcs' reward model."""
    chosen = config.ppo.value_model
    if chosen != "reward_model":
        return chosen
    named = [
        name.strip().removeprefix(model_reward.PREFIX)
        for name in config.grpo.reward_funcs.split(",")
        if name.strip().startswith(model_reward.PREFIX)
    ]
    need(
        config,
        len(named) == 1,
        "ppo.value_model",
        f"'reward_model' starts the critic from the reward model of grpo.reward_funcs, which "
        f"names {len(named)}; name its export (a folder) instead.",
    )
    return named[0]


def attach_critic(config: RunSpec, model: CausalLM, mesh: Any) -> Any:
    """PPO's critic on `model` (models/value_head.py), and the filter of its weights (trained
    beside the run's own): a zero value head on the trunk, or a copy of a reward model's
    export (safetensors only) on the policy's mesh, which must read the policy's tokens."""
    directory = critic_dir(config)
    if not directory:
        value_head.attach_value_head(model)
        return value_head.CRITIC_WEIGHTS
    critic = from_pretrained(
        model_reward.check(directory),
        mesh=mesh,
        param_dtype=DTYPES[config.model.param_dtype],
        dtype=DTYPES[config.model.compute_dtype],
        attention=model.config.attention,
        max_segments=model.config.max_segments,
    )
    need(
        config,
        critic.config.vocab_size == model.config.vocab_size,
        "ppo.value_model",
        f"{directory} reads a vocabulary of {critic.config.vocab_size} tokens, the policy "
        f"{model.config.vocab_size}: the critic scores the policy's tokens, so it must share "
        "its tokenizer (a reward model trained from the same base).",
    )
    value_head.attach_critic(model, critic)
    return value_head.CRITIC_WEIGHTS
