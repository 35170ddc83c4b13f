"""Preference objectives (DPO and its variants, SimPO, ORPO) with TRL's definitions and names.

A batch holds preference pairs as documents of its rows: pair k of a row is segment 2k - 1 (the
chosen reply, with its prompt) and segment 2k (the rejected one), so the two never attend to each
other (segment ids) and one or several pairs share a row (sft_jax.data.preference builds them).
`target_mask` marks the completion tokens; a sequence's log-prob is the sum of log p(target) over
them, computed in chunks (sft_jax.objectives.loss.token_logps), never from full float32 logits.

With p = log pi(chosen), q = log pi(rejected) summed over completion tokens, p0, q0 the same
under the reference, d = (p - p0) - (q - q0), n_c, n_r the completion lengths (TRL 1.16):
  sigmoid  -(1 - e) log s(b d) - e log s(-b d)        (e = label_smoothing: cDPO; TRL 1.16's
                                                     "sigmoid" ignores e, which equals e = 0)
  robust   (-(1 - e) log s(b d) + e log s(-b d)) / (1 - 2 e)
  hinge    relu(1 - b d)
  ipo      ((p - p0) / n_c - (q - q0) / n_r - 1 / (2 b))^2
  simpo    -(1 - e) log s(b m) - e log s(-b m), m = p / n_c - q / n_r - gamma / b (no reference)
  orpo     -b log s(log odds(p / n_c) - log odds(q / n_r)), log odds(x) = x - log(1 - e^x),
           plus the NLL of the chosen sequences (a token mean over the batch): with
           orpo_nll="prompt_and_reply" (the default) TRL's, every token of the chosen sequence
           after its first, prompt included; with orpo_nll="reply" its completion tokens only
rpo_alpha adds rpo_alpha x the NLL of the chosen completion tokens to any of them (TRL:
loss_type ["sigmoid", "sft"] with loss_weights [1, rpo_alpha]; CPOTrainer's cpo_alpha for
simpo). Pair losses are means over the pairs of the global batch, the NLLs means over the
chosen tokens they cover: all are summed per micro-batch and divided once, so accumulation and
the mesh do not change them.

ORPO's NLL follows TRL 1.16's ORPOTrainer.concatenated_forward (as the ORPO authors' code):
labels = the chosen input_ids where attention_mask is 1 ("orpo chosen nll loss is computed over
the full prompt and response"), cross_entropy_loss shifts them (logits[..., :-1], labels[...,
1:]) and nn.CrossEntropyLoss averages over every label of every chosen row. So a chosen
sequence of L tokens (its BOS, prompt, reply and whatever the template writes after the
end-of-turn token) contributes L - 1 predictions: of every token but its first, made at every
position but its last (chosen_sequence_mask). The odds ratio's log-probs are per-token means
over the completion tokens only (get_batch_logps on the labels with the prompt at -100).

Rewards as TRL logs them: b (p - p0) and b (q - q0); b p / n_c and b q / n_r for simpo and orpo,
whose logps/* are per-token means too. ORPO also logs ORPOTrainer's nll_loss (its NLL term),
log_odds_ratio (the mean over pairs of log s(log odds)) and log_odds_chosen (the mean log odds).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from sft_jax.adapters.lora import adapters_off
from sft_jax.core.batch import REFERENCE_KEY
from sft_jax.core.errors import ConfigError
from sft_jax.models.decoder import CausalLM
from sft_jax.objectives.loss import hidden_token_logps, token_logps

Batch = dict[str, jax.Array]
REFERENCE_FREE = ("simpo", "orpo")
REFERENCES = ("auto", "adapters_off", "copy", "precomputed")  # config.preference.reference
DPO_LOSSES = ("sigmoid", "robust", "hinge", "ipo")
LOSS_TYPES = (*DPO_LOSSES, *REFERENCE_FREE)
# config.preference.orpo_nll: ORPO's NLL over the chosen sequence's prompt and reply (TRL's), or
# over its reply only.
ORPO_NLL = ("prompt_and_reply", "reply")


class PairLogps(NamedTuple):
    """Per pair slot [B, P] of a batch (P pairs a row at most): summed log-probs and lengths."""

    chosen: jax.Array
    rejected: jax.Array
    chosen_tokens: jax.Array
    rejected_tokens: jax.Array

    @property
    def valid(self) -> jax.Array:
        """Slots that hold a pair (rows may hold fewer than P; padding rows none)."""
        return (self.chosen_tokens > 0) & (self.rejected_tokens > 0)


def pair_logps(logps_BxT: jax.Array, batch: Batch, max_pairs: int) -> PairLogps:
    """Sums of log p over the completion tokens of each pair's chosen and rejected segment."""
    segments = jnp.arange(1, 2 * max_pairs + 1, dtype=batch["segment_ids"].dtype)
    one_hot_BxTxS = batch["segment_ids"][..., None] == segments[None, None, :]
    weights_BxTxS = (one_hot_BxTxS & batch["target_mask"][..., None]).astype(jnp.float32)
    logps_BxS = jnp.einsum(
        "bt,bts->bs", jnp.where(batch["target_mask"], logps_BxT, 0.0), weights_BxTxS
    )
    tokens_BxS = jnp.sum(weights_BxTxS, axis=1)
    return PairLogps(
        logps_BxS[:, 0::2], logps_BxS[:, 1::2], tokens_BxS[:, 0::2], tokens_BxS[:, 1::2]
    )


def chosen_token_mask(batch: Batch) -> jax.Array:
    """Completion tokens [B, T] of chosen replies (odd segments)."""
    return batch["target_mask"] & (batch["segment_ids"] % 2 == 1)


def chosen_sequence_mask(batch: Batch, max_pairs: int) -> jax.Array:
    """Positions [B, T] of the chosen sequences (odd segments) that predict a token of their own
    sequence: all but each sequence's last, prompt included (TRL ORPOTrainer's NLL labels; see
    the module docstring). A position is its sequence's last by its `positions` value against
    the sequence's length, not by its neighbour, so the context axis's token order
    (models/partitioning.context_layout) does not change the mask."""
    segment_ids = batch["segment_ids"]
    chosen = jnp.arange(1, 2 * max_pairs, 2, dtype=segment_ids.dtype)
    one_hot_BxTxP = segment_ids[..., None] == chosen[None, None, :]
    lengths_BxP = jnp.sum(one_hot_BxTxP, axis=1, dtype=jnp.int32)
    length_BxT = jnp.sum(jnp.where(one_hot_BxTxP, lengths_BxP[:, None, :], 0), axis=-1)
    return (length_BxT > 0) & (batch["positions"] < length_BxT - 1)


@dataclasses.dataclass(frozen=True)
class PreferenceSpec:
    """config.preference: the loss and its constants (TRL's names)."""

    loss_type: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    rpo_alpha: float = 0.0
    orpo_nll: str = "prompt_and_reply"  # ORPO_NLL

    @property
    def orpo_sequence_nll(self) -> bool:
        """Whether the loss holds ORPO's NLL over the chosen sequences, prompt included (TRL's)."""
        return self.loss_type == "orpo" and self.orpo_nll == "prompt_and_reply"

    @property
    def nll_weight(self) -> float:
        """Weight of the NLL of the chosen replies' completion tokens in the loss: rpo_alpha,
        plus ORPO's SFT term (weight 1) under orpo_nll="reply"."""
        orpo_reply = self.loss_type == "orpo" and not self.orpo_sequence_nll
        return self.rpo_alpha + (1.0 if orpo_reply else 0.0)


def _smoothed_sigmoid(logits: jax.Array, beta: float, smoothing: float) -> jax.Array:
    return -(1 - smoothing) * jax.nn.log_sigmoid(beta * logits) - smoothing * jax.nn.log_sigmoid(
        -beta * logits
    )


def _log1mexp(x: jax.Array) -> jax.Array:
    """log(1 - e^x) for x < 0, accurate at both ends."""
    return jnp.where(x > -0.6931472, jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


class PairTerms(NamedTuple):
    """Per pair: the loss, the rewards TRL logs, the log-probs it logs as logps/*, and ORPO's
    log odds ratio (0 for the other losses)."""

    loss: jax.Array
    chosen_rewards: jax.Array
    rejected_rewards: jax.Array
    chosen_logps: jax.Array
    rejected_logps: jax.Array
    log_odds: jax.Array


def pair_terms(spec: PreferenceSpec, policy: PairLogps, reference: PairLogps | None) -> PairTerms:
    """The loss of each pair slot (see the module docstring); slots without a pair give finite
    values, which the caller weights by 0."""
    beta, smoothing = spec.beta, spec.label_smoothing
    chosen_len = jnp.maximum(policy.chosen_tokens, 1.0)
    rejected_len = jnp.maximum(policy.rejected_tokens, 1.0)
    if spec.loss_type in REFERENCE_FREE:
        chosen, rejected = policy.chosen / chosen_len, policy.rejected / rejected_len
        if spec.loss_type == "simpo":
            loss = _smoothed_sigmoid(chosen - rejected - spec.simpo_gamma / beta, beta, smoothing)
            log_odds = jnp.zeros_like(loss)
        else:  # orpo; padding slots (0 / 1) would give log(0)
            chosen_safe = jnp.minimum(chosen, -1e-6)
            rejected_safe = jnp.minimum(rejected, -1e-6)
            log_odds = (chosen_safe - rejected_safe) - (
                _log1mexp(chosen_safe) - _log1mexp(rejected_safe)
            )
            loss = -beta * jax.nn.log_sigmoid(log_odds)
        return PairTerms(loss, beta * chosen, beta * rejected, chosen, rejected, log_odds)
    chosen_ratio = policy.chosen - reference.chosen
    rejected_ratio = policy.rejected - reference.rejected
    delta = chosen_ratio - rejected_ratio
    if spec.loss_type == "sigmoid":
        loss = _smoothed_sigmoid(delta, beta, smoothing)
    elif spec.loss_type == "robust":
        loss = (
            -(1 - smoothing) * jax.nn.log_sigmoid(beta * delta)
            + smoothing * jax.nn.log_sigmoid(-beta * delta)
        ) / (1 - 2 * smoothing)
    elif spec.loss_type == "hinge":
        loss = jax.nn.relu(1 - beta * delta)
    else:  # ipo, length-normalised as TRL
        loss = jnp.square(chosen_ratio / chosen_len - rejected_ratio / rejected_len - 0.5 / beta)
    return PairTerms(
        loss,
        beta * chosen_ratio,
        beta * rejected_ratio,
        policy.chosen,
        policy.rejected,
        jnp.zeros_like(loss),
    )


class ReferenceWeight(nnx.Variable):
    """A weight of DPO's frozen reference (a copy of the initial weights, or
    config.preference.reference_model's): not an nnx.Param, so never trained, never in the
    optimizer state or a checkpoint; sharded like the parameter it stands for (same logical
    axes)."""


def _freeze(model: CausalLM, copy: bool) -> CausalLM:
    """`model` with its parameters turned into ReferenceWeights (in place), each in a new
    buffer where `copy` (the train step donates the parameters' buffers)."""
    for _, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Module):
            for name, value in list(vars(node).items()):
                if isinstance(value, nnx.Param):
                    weight = jnp.copy(value.get_value()) if copy else value.get_value()
                    setattr(node, name, ReferenceWeight(weight, **value.get_metadata()))
    return model


def attach_frozen_copy(model: CausalLM) -> None:
    """model.reference: a copy of the model as it is now (the run's initial weights, also on a
    resume, which reloads them), its parameters turned into ReferenceWeights held in new
    buffers (the train step donates the parameters' buffers)."""
    model.reference = _freeze(nnx.clone(model), copy=True)


def attach_reference(model: CausalLM, reference: CausalLM) -> None:
    """model.reference: `reference` (another model of the same architecture, loaded on the
    policy's mesh: config.preference.reference_model), its parameters turned into
    ReferenceWeights: frozen variables of the steps, as attach_frozen_copy's copy."""
    model.reference = _freeze(reference, copy=False)


class PreferenceSums(NamedTuple):
    """Sums over the pairs (and chosen completion tokens) of a batch; additive."""

    loss: jax.Array  # sum over pairs of the pair loss
    chosen_nll: jax.Array  # sum of -log p over chosen completion tokens
    pairs: jax.Array
    chosen_tokens: jax.Array
    rewards_chosen: jax.Array
    rewards_rejected: jax.Array
    accuracies: jax.Array  # pairs whose chosen reward beats the rejected one
    margins: jax.Array
    logps_chosen: jax.Array
    logps_rejected: jax.Array
    # ORPO (0 for the other losses): TRL's NLL term over the chosen sequences, prompt included
    # (orpo_nll="prompt_and_reply"; chosen_sequence_mask), and the log odds ratio's sums.
    sequence_nll: jax.Array  # sum of -log p over the chosen sequences' tokens after their first
    sequence_tokens: jax.Array
    log_odds_ratio: jax.Array  # sum over pairs of log s(log odds) (TRL's log_odds_ratio)
    log_odds_chosen: jax.Array  # sum over pairs of the log odds (TRL's log_odds_chosen)


class PairCount(NamedTuple):
    """What the sums are divided by, over the whole global batch."""

    pairs: jax.Array
    chosen_tokens: jax.Array
    sequence_tokens: jax.Array  # chosen_sequence_mask's tokens (ORPO's NLL), at least 1


@dataclasses.dataclass(frozen=True)
class PairObjective:
    """A preference loss as a step.Objective (the train step is SFT's, unchanged).

    reference: "adapters_off" (LoRA / QLoRA: the same weights with every adapter scaled to 0,
    under stop_gradient: no second copy of the model), "copy" (model.reference, frozen: a copy
    of the initial weights, see attach_frozen_copy, or config.preference.reference_model's,
    see attach_reference), "precomputed" (the batch's REFERENCE_KEY: reference_token_logps
    computed in one pass before training, no reference forward in the step) or "none"
    (SimPO, ORPO).
    max_pairs: most pairs a row holds (segments 1 .. 2 * max_pairs). On a mixture of experts
    the router's losses are added by objectives/moe.RouterLosses, as for SFT.
    """

    spec: PreferenceSpec
    reference: str = "adapters_off"
    max_pairs: int = 1
    loss_chunk_size: int = 512

    @property
    def reference_forwards(self) -> int:
        """Forward passes of a reference model per step (for MFU): 1 where the step runs one."""
        return 0 if self.reference in ("none", "precomputed") else 1

    @property
    def batch_keys(self) -> tuple[str, ...]:
        """Batch arrays the step takes beyond core.batch.BASE_KEYS."""
        return (REFERENCE_KEY,) if self.reference == "precomputed" else ()

    def reference_token_logps(self, model: CausalLM, batch: Batch) -> jax.Array:
        """The reference's log p(target) [B, T] (0 off the completion tokens): under
        model.reference where the model has one (config.preference.reference_model), else
        under `model` with its adapters off (a no-op without any). What reference='precomputed'
        reads from the batch, computed once before training (sft_jax.train.compiled)."""
        reference = getattr(model, "reference", None)
        if reference is not None:
            logps_BxT = token_logps(reference, batch, self.loss_chunk_size)
        else:
            with adapters_off(model):
                logps_BxT = token_logps(model, batch, self.loss_chunk_size)
        return jnp.where(batch["target_mask"], logps_BxT, 0.0)

    def policy_and_reference(
        self, model: CausalLM, batch: Batch, dropout_key: jax.Array | None
    ) -> tuple[jax.Array, PairLogps, PairLogps | None, Any]:
        """(per-token log-probs, pair log-probs under the policy, and under the reference,
        the router statistics of the policy's forward pass (None for a dense model))."""
        hidden_BxTxD, stats = model.forward(
            batch["input_ids"], batch["positions"], batch["segment_ids"], dropout_key
        )
        logps_BxT = hidden_token_logps(model, hidden_BxTxD, batch, self.loss_chunk_size)
        policy = pair_logps(logps_BxT, batch, self.max_pairs)
        if self.reference == "none":
            return logps_BxT, policy, None, stats
        if self.reference == "precomputed":
            reference_BxT = batch[REFERENCE_KEY]
        elif self.reference == "copy":
            reference_BxT = token_logps(model.reference, batch, self.loss_chunk_size)
        else:
            reference_BxT = self.reference_token_logps(model, batch)
        reference_BxT = jax.lax.stop_gradient(reference_BxT)
        return logps_BxT, policy, pair_logps(reference_BxT, batch, self.max_pairs), stats

    def sums(self, model: CausalLM, batch: Batch, dropout_key=None) -> PreferenceSums:
        return self.sums_with_router(model, batch, dropout_key)[0]

    def sums_with_router(
        self, model: CausalLM, batch: Batch, dropout_key=None
    ) -> tuple[PreferenceSums, Any]:
        """sums, and the router statistics of the policy's forward pass (objectives/moe.py)."""
        logps_BxT, policy, reference, stats = self.policy_and_reference(model, batch, dropout_key)
        terms = pair_terms(self.spec, policy, reference)
        valid = policy.valid.astype(jnp.float32)
        chosen_mask = chosen_token_mask(batch)

        def total(x: jax.Array) -> jax.Array:
            return jnp.sum(jnp.where(valid > 0, x, 0.0))

        wins = (terms.chosen_rewards > terms.rejected_rewards).astype(jnp.float32)
        zero = jnp.zeros((), jnp.float32)
        sequence_nll = sequence_tokens = log_odds_ratio = log_odds_chosen = zero
        if self.spec.orpo_sequence_nll:
            sequence_mask = chosen_sequence_mask(batch, self.max_pairs)
            sequence_nll = -jnp.sum(jnp.where(sequence_mask, logps_BxT, 0.0))
            sequence_tokens = jnp.sum(sequence_mask.astype(jnp.float32))
        if self.spec.loss_type == "orpo":
            log_odds_ratio = total(jax.nn.log_sigmoid(terms.log_odds))
            log_odds_chosen = total(terms.log_odds)
        return PreferenceSums(
            loss=total(terms.loss),
            chosen_nll=-jnp.sum(jnp.where(chosen_mask, logps_BxT, 0.0)),
            pairs=jnp.sum(valid),
            chosen_tokens=jnp.sum(chosen_mask.astype(jnp.float32)),
            rewards_chosen=total(terms.chosen_rewards),
            rewards_rejected=total(terms.rejected_rewards),
            accuracies=total(wins),
            margins=total(terms.chosen_rewards - terms.rejected_rewards),
            logps_chosen=total(terms.chosen_logps),
            logps_rejected=total(terms.rejected_logps),
            sequence_nll=sequence_nll,
            sequence_tokens=sequence_tokens,
            log_odds_ratio=log_odds_ratio,
            log_odds_chosen=log_odds_chosen,
        ), stats

    def normalizer(self, batch: Batch) -> PairCount:
        ones = jnp.ones(batch["target_mask"].shape, jnp.float32)
        slots = pair_logps(ones, batch, self.max_pairs)
        chosen = jnp.sum(chosen_token_mask(batch).astype(jnp.float32))
        sequence = jnp.zeros((), jnp.float32)
        if self.spec.orpo_sequence_nll:
            sequence = jnp.sum(chosen_sequence_mask(batch, self.max_pairs).astype(jnp.float32))
        return PairCount(
            jnp.maximum(jnp.sum(slots.valid.astype(jnp.float32)), 1.0),
            jnp.maximum(chosen, 1.0),
            jnp.maximum(sequence, 1.0),
        )

    def orpo_nll(self, sums: PreferenceSums, normalizer: PairCount) -> jax.Array:
        """ORPO's NLL term (TRL's nll_loss): over the chosen sequences, prompt included, or
        over the chosen replies (spec.orpo_nll)."""
        if self.spec.orpo_sequence_nll:
            return sums.sequence_nll / normalizer.sequence_tokens
        return sums.chosen_nll / normalizer.chosen_tokens

    def loss(self, sums: PreferenceSums, normalizer: PairCount) -> jax.Array:
        loss = sums.loss / normalizer.pairs
        if self.spec.nll_weight:
            loss = loss + self.spec.nll_weight * sums.chosen_nll / normalizer.chosen_tokens
        if self.spec.orpo_sequence_nll:
            loss = loss + self.orpo_nll(sums, normalizer)
        return loss

    def eval_metrics(self, sums: PreferenceSums) -> dict[str, float]:
        """Over the whole eval set (its sums added up): the metrics, as "eval/..."."""
        if float(sums.pairs) == 0:
            raise ConfigError(
                "the eval set holds no preference pairs: check config.data.eval_files."
            )
        count = PairCount(
            sums.pairs,
            jnp.maximum(sums.chosen_tokens, 1.0),
            jnp.maximum(sums.sequence_tokens, 1.0),
        )
        return {k: float(v) for k, v in self.metrics(sums, count, prefix="eval").items()}

    def metrics(self, sums: PreferenceSums, normalizer: PairCount, prefix: str = "train"):
        """TRL's names: means over the pairs of the batch (the NLLs over their tokens)."""
        per_pair = {
            "rewards/chosen": sums.rewards_chosen,
            "rewards/rejected": sums.rewards_rejected,
            "rewards/accuracies": sums.accuracies,
            "rewards/margins": sums.margins,
            "logps/chosen": sums.logps_chosen,
            "logps/rejected": sums.logps_rejected,
        }
        metrics = {f"{prefix}/{k}": v / normalizer.pairs for k, v in per_pair.items()}
        metrics |= {
            f"{prefix}/loss": self.loss(sums, normalizer),
            f"{prefix}/nll": sums.chosen_nll / normalizer.chosen_tokens,
            f"{prefix}/pairs": sums.pairs,
        }
        if self.spec.loss_type == "orpo":  # ORPOTrainer's own
            metrics |= {
                f"{prefix}/nll_loss": self.orpo_nll(sums, normalizer),
                f"{prefix}/log_odds_ratio": sums.log_odds_ratio / normalizer.pairs,
                f"{prefix}/log_odds_chosen": sums.log_odds_chosen / normalizer.pairs,
            }
        return metrics
