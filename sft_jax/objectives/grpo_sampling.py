"""The sampler against the trainer in online RL: the numerics gate and the truncated
importance-sampling correction (TRL 1.16's `vllm_importance_sampling_correction`).

Per completion token, d_t = log p_train(t) - log p_sampler(t): the training forward's log-prob
of the sampled token on the same params against the sampler's. The gate stops a run where
max |d_t| passes a threshold. The correction multiplies each token's policy loss (before the KL
term) by an importance weight of the sampler's distribution, as TRL does:

  token_truncate      w_t = clip(exp(d_t), clip_min, clip_max)
  token_mask          w_t = exp(d_t), 0 where outside [clip_min, clip_max]
  sequence_truncate   w_i = clip(exp(sum_t d_t), ...) on every token of completion i
  sequence_mask       w_i = exp(sum_t d_t), 0 where outside [...]  (TRL's default mode)

clip_max = 0 means no upper bound (TRL's None); clip_min = 0 is no lower bound, as the
weights are positive. The sampler here runs in-process on the training params, so d_t is
float noise (1e-5 over the GRPO demo): the correction matters where the sampler computes in a
lower precision than the trainer.
"""

from __future__ import annotations

import numpy as np

from sft_jax.core.batch import TOKEN, Field, register
from sft_jax.core.errors import UserError

MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")

IS_RATIO_KEY = register(
    "importance_sampling_ratio",
    Field(np.float32, TOKEN, "the sampler-mismatch weight of a completion token's loss; 0 off"),
)


class SamplerDivergedError(UserError):
    """The sampler's log-probs of its own tokens are not the training forward's."""


def correction_weights(
    sampler_logps: np.ndarray,
    train_logps: np.ndarray,
    mask: np.ndarray,
    mode: str,
    clip_min: float = 0.0,
    clip_max: float = 3.0,
) -> np.ndarray:
    """The weights w [B, T] of the module docstring (a sequence's weight on each of its
    tokens), 0 off the mask."""
    if mode not in MODES:
        raise ValueError(f"importance sampling mode {mode!r}: one of {', '.join(MODES)}")
    mask = np.asarray(mask, bool)
    diff = np.where(mask, np.asarray(train_logps, np.float64) - sampler_logps, 0.0)
    if mode.startswith("sequence"):
        diff = np.broadcast_to(diff.sum(-1, keepdims=True), diff.shape)
    ratio = np.exp(diff)
    high = clip_max if clip_max > 0 else np.inf
    if mode.endswith("truncate"):
        ratio = np.clip(ratio, clip_min, high)
    else:
        ratio = np.where((ratio < clip_min) | (ratio > high), 0.0, ratio)
    return np.where(mask, ratio, 0.0).astype(np.float32)


def sampling_metrics(
    sampler_logps: np.ndarray,
    train_logps: np.ndarray,
    mask: np.ndarray,
    weights: np.ndarray | None = None,
    mode: str = "token_truncate",
) -> dict[str, float]:
    """TRL's names for how far the sampler's log-probs of the sampled tokens are from the
    training forward's on the same tokens and params ([B, T] each, compared where mask); the
    importance_sampling_ratio figures are of the correction's weights where there are any
    (per token, or per sequence in the sequence modes, as TRL's), else of exp(d_t)."""
    mask = np.asarray(mask, bool)
    if not mask.any():
        return {}
    log_ratio = (np.asarray(train_logps, np.float64) - np.asarray(sampler_logps, np.float64))[mask]
    gap = np.abs(log_ratio)
    if weights is None:
        ratio = np.exp(log_ratio)
    elif mode.startswith("sequence"):
        rows = mask.any(-1)
        ratio = np.asarray(weights, np.float64)[rows, np.argmax(mask[rows], -1)]
    else:
        ratio = np.asarray(weights, np.float64)[mask]
    return {
        "sampling/sampling_logp_difference/mean": float(gap.mean()),
        "sampling/sampling_logp_difference/max": float(gap.max()),
        "sampling/importance_sampling_ratio/min": float(ratio.min()),
        "sampling/importance_sampling_ratio/mean": float(ratio.mean()),
        "sampling/importance_sampling_ratio/max": float(ratio.max()),
    }


def check_sampling(step: int, metrics: dict[str, float], max_difference: float) -> None:
    """Stops the run where the sampler and the trainer disagree by more than max_difference
    (0: no gate): the ratios of the loss would then measure the disagreement, not the update."""
    largest = metrics.get("sampling/sampling_logp_difference/max", 0.0)
    if max_difference > 0 and largest > max_difference:
        raise SamplerDivergedError(
            f"step {step}: the sampler's log-probs of its tokens differ from the training "
            f"forward's on the same tokens and params by up to {largest:.3g} (mean "
            f"{metrics['sampling/sampling_logp_difference/mean']:.3g}), over "
            f"grpo.max_sampling_logp_difference={max_difference:g}. The sampler and the trainer "
            "must compute the same distribution (same dtype, temperature, top_p/top_k applied "
            "after the log-probs); nothing of this step was trained on."
        )
