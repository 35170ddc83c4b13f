"""The reward-model objective: Bradley-Terry on preference pairs, as TRL's RewardTrainer.

The model is a causal LM with a scalar `score` head (models/decoder.py; transformers'
*ForSequenceClassification with num_labels=1). A sequence's reward is the head's output at its
last token that is not the pad token, as transformers reads it; in a packed row each segment is a
sequence, pair k of the row being segments 2k - 1 (chosen) and 2k (rejected) as for DPO
(sft_jax.data.preference builds the rows):

  row          = [P C C <eot>][P R <eot>][pad]      (pad id = <eot> id: the reward is read at the
  segment_ids  = [1 1 1 1     2 2 2     0  ]         last C and at R, as transformers does)

With r_c, r_r the rewards of a pair and m its margin (TRL's `margin` column; 0 without one):
  loss = mean over pairs of -log sigmoid(r_c - r_r - m)
         + center_rewards_coefficient * mean over pairs of (r_c + r_r)^2
Metrics with TRL's names: accuracy (pairs with r_c > r_r), margin (mean r_c - r_r), mean_reward,
min_reward and max_reward (over the global batch, and over the whole eval set where TRL logs
the mean of its eval batches' extremes).
On a mixture of experts the router's load-balancing loss is added as for SFT (moe_loss.py).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from sft_jax.adapters.lora import names
from sft_jax.core.batch import MARGIN_KEY
from sft_jax.core.errors import ConfigError, need
from sft_jax.core.spec import RunSpec
from sft_jax.models.decoder import CausalLM
from sft_jax.objectives.preference_config import check_no_reference_model, check_pair_fields

Batch = dict[str, jax.Array]


class SegmentRewards(NamedTuple):
    """Per pair slot [B, P]: the rewards of the chosen and rejected sequence."""

    chosen: jax.Array
    rejected: jax.Array
    valid: jax.Array  # slots that hold a pair
    margin: jax.Array


def last_token_index(batch: Batch, segments: int, pad_token_id: int) -> jax.Array:
    """[B, S]: the position of the last token of segment s + 1 whose id is not the pad id
    (transformers' rule for a sequence alone in its row), -1 where the segment has none."""
    segment_ids = jnp.arange(1, segments + 1, dtype=batch["segment_ids"].dtype)
    member_BxTxS = (batch["segment_ids"][..., None] == segment_ids[None, None, :]) & (
        batch["input_ids"] != pad_token_id
    )[..., None]
    positions_T = jnp.arange(batch["input_ids"].shape[1])
    return jnp.max(jnp.where(member_BxTxS, positions_T[None, :, None], -1), axis=1)


def pair_rewards(
    scores_BxT: jax.Array, batch: Batch, max_pairs: int, pad_token_id: int
) -> SegmentRewards:
    """The reward of each pair's chosen and rejected sequence, and its margin."""
    last_BxS = last_token_index(batch, 2 * max_pairs, pad_token_id)
    index_BxS = jnp.maximum(last_BxS, 0)
    rewards_BxS = jnp.take_along_axis(scores_BxT, index_BxS, axis=1)
    present_BxS = last_BxS >= 0
    margin = jnp.zeros_like(rewards_BxS[:, 0::2])
    if MARGIN_KEY in batch:
        margin = batch[MARGIN_KEY][:, : 2 * max_pairs : 2]  # per segment: chosen ones
    return SegmentRewards(
        rewards_BxS[:, 0::2],
        rewards_BxS[:, 1::2],
        present_BxS[:, 0::2] & present_BxS[:, 1::2],
        margin,
    )


class RewardSums(NamedTuple):
    """Sums over the pairs of a batch (additive over micro-batches)."""

    loss: jax.Array  # sum over pairs of -log sigmoid(r_c - r_r - m)
    centering: jax.Array  # sum over pairs of (r_c + r_r)^2
    pairs: jax.Array
    accuracy: jax.Array  # pairs with r_c > r_r
    margin: jax.Array  # sum of r_c - r_r
    rewards: jax.Array  # sum of r_c + r_r
    min_reward: jax.Array  # the lowest reward of a chosen or rejected sequence (not a sum)
    max_reward: jax.Array  # the highest (not a sum)


@dataclasses.dataclass(frozen=True)
class RewardObjective:
    """Bradley-Terry as a step.Objective (the train step is SFT's, unchanged).

    pad_token_id: the token the reward is never read at (the exported config.json's).
    max_pairs: most pairs a row holds (segments 1 .. 2 * max_pairs).
    On a mixture of experts the router's losses are added by objectives/moe.RouterLosses.
    """

    pad_token_id: int
    max_pairs: int = 1
    center_rewards_coefficient: float = 0.0
    batch_keys: tuple[str, ...] = (MARGIN_KEY,)  # the step's batch arrays beyond BASE_KEYS

    def sums(self, model: CausalLM, batch: Batch, dropout_key=None) -> RewardSums:
        return self.sums_with_router(model, batch, dropout_key)[0]

    def sums_with_router(
        self, model: CausalLM, batch: Batch, dropout_key=None
    ) -> tuple[RewardSums, Any]:
        """sums, and the router statistics of the forward pass (objectives/moe.py)."""
        hidden_BxTxD, stats = model.forward(
            batch["input_ids"], batch["positions"], batch["segment_ids"], dropout_key
        )
        scores_BxT = model.scores(hidden_BxTxD)[..., 0]
        pairs = pair_rewards(scores_BxT, batch, self.max_pairs, self.pad_token_id)
        difference = pairs.chosen - pairs.rejected
        valid = pairs.valid

        def total(x: jax.Array) -> jax.Array:
            return jnp.sum(jnp.where(valid, x, 0.0))

        return RewardSums(
            loss=total(-jax.nn.log_sigmoid(difference - pairs.margin)),
            centering=total(jnp.square(pairs.chosen + pairs.rejected)),
            pairs=jnp.sum(valid.astype(jnp.float32)),
            accuracy=total((difference > 0).astype(jnp.float32)),
            margin=total(difference),
            rewards=total(pairs.chosen + pairs.rejected),
            min_reward=jnp.min(
                jnp.where(valid, jnp.minimum(pairs.chosen, pairs.rejected), jnp.inf)
            ),
            max_reward=jnp.max(
                jnp.where(valid, jnp.maximum(pairs.chosen, pairs.rejected), -jnp.inf)
            ),
        ), stats

    def no_sums(self, zeros: RewardSums) -> RewardSums:
        """The sums of no pairs (what add_sums starts from)."""
        return zeros._replace(
            min_reward=zeros.min_reward + jnp.inf, max_reward=zeros.max_reward - jnp.inf
        )

    def add_sums(self, a: RewardSums, b: RewardSums) -> RewardSums:
        """Two batches' sums as one: sums add, the extreme rewards are the extremes of both."""
        added = jax.tree.map(jnp.add, a, b)
        return added._replace(
            min_reward=jnp.minimum(a.min_reward, b.min_reward),
            max_reward=jnp.maximum(a.max_reward, b.max_reward),
        )

    def normalizer(self, batch: Batch) -> jax.Array:
        """Pairs of the whole global batch."""
        last_BxS = last_token_index(batch, 2 * self.max_pairs, self.pad_token_id)
        valid = (last_BxS[:, 0::2] >= 0) & (last_BxS[:, 1::2] >= 0)
        return jnp.maximum(jnp.sum(valid.astype(jnp.float32)), 1.0)

    def loss(self, sums: RewardSums, normalizer: jax.Array) -> jax.Array:
        return (sums.loss + self.center_rewards_coefficient * sums.centering) / normalizer

    def metrics(self, sums: RewardSums, normalizer: jax.Array, prefix: str = "train"):
        """TRL's names (RewardTrainer): means over the pairs of the batch."""
        metrics = {
            f"{prefix}/loss": self.loss(sums, normalizer),
            f"{prefix}/accuracy": sums.accuracy / normalizer,
            f"{prefix}/margin": sums.margin / normalizer,
            f"{prefix}/mean_reward": sums.rewards / (2 * normalizer),
            f"{prefix}/min_reward": sums.min_reward,
            f"{prefix}/max_reward": sums.max_reward,
            f"{prefix}/pairs": sums.pairs,
        }
        return metrics

    def eval_metrics(self, sums: RewardSums) -> dict[str, float]:
        """Over the whole eval set (its sums added up): the metrics, as "eval/..."."""
        if float(sums.pairs) == 0:
            raise ConfigError(
                "the eval set holds no preference pairs: check config.data.eval_files."
            )
        return {k: float(v) for k, v in self.metrics(sums, sums.pairs, prefix="eval").items()}


def objective_from_config(
    config: RunSpec,
    max_segments: int,
    pad_token_id: int | None,
) -> RewardObjective:
    """The RewardObjective of a run: rows hold (max_segments - 1) // 2 pairs."""
    if pad_token_id is None:
        raise ConfigError(
            "train.objective='reward' reads each sequence's reward at its last token that is not "
            "the pad token, but neither the tokenizer nor config.json names a pad token. Set "
            "pad_token_id in the model's config.json (or the tokenizer's pad_token)."
        )
    return RewardObjective(
        pad_token_id,
        max_pairs=max(1, (max_segments - 1) // 2),
        center_rewards_coefficient=config.preference.center_rewards_coefficient,
    )


def check_config(config: RunSpec) -> None:
    """The fields a reward model reads: no LM head, reward centring, no generation; then the
    fields of every objective over pairs."""
    need(
        config,
        "lm_head" not in names(config.lora.trainable_modules),
        "lora.trainable_modules",
        "a reward model has no LM head (its score head trains in "
        "full under LoRA anyway): leave 'lm_head' out.",
    )
    need(
        config,
        config.preference.center_rewards_coefficient >= 0,
        "preference.center_rewards_coefficient",
        "must be 0 (off) or positive.",
    )
    for field in ("generate_examples", "show_samples"):
        need(
            config,
            getattr(config.eval, field) == 0,
            f"eval.{field}",
            "a reward model scores sequences and does not generate: set it to 0.",
        )
    check_pair_fields(config)
    check_no_reference_model(config)
