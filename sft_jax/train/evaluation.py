"""Eval over the whole eval set, early stopping on its loss, and the lines that report both."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from typing import Any

import jax
import numpy as np

from sft_jax.core.errors import ConfigError
from sft_jax.train.compiled import Steps
from sft_jax.train.sharding import device_batch
from sft_jax.train.step import add_sums


@dataclasses.dataclass
class EarlyStopping:
    """Stops after `patience` evaluations without an improvement of at least `min_delta`.
    best_loss is the lowest score so far (workdir/checkpointing.selection_score: the eval loss,
    or online RL's eval reward negated)."""

    patience: int
    min_delta: float
    best_loss: float = math.inf
    best_step: int = -1
    evals_without_improvement: int = 0

    def update(self, step: int, loss: float) -> bool:
        """Records an eval; True when training should stop."""
        if loss < self.best_loss - self.min_delta:
            self.best_loss, self.best_step = loss, step
            self.evals_without_improvement = 0
            return False
        self.evals_without_improvement += 1
        return 0 < self.patience <= self.evals_without_improvement

    def dump(self) -> dict[str, Any]:
        """What a checkpoint keeps, so patience and the best step survive a restart."""
        best = None if math.isinf(self.best_loss) else self.best_loss
        return {
            "best_loss": best,
            "best_step": self.best_step,
            "evals_without_improvement": self.evals_without_improvement,
        }

    def load(self, saved: dict[str, Any]) -> None:
        if saved:
            best = saved["best_loss"]
            self.best_loss = math.inf if best is None else float(best)
            self.best_step = int(saved["best_step"])
            self.evals_without_improvement = int(saved["evals_without_improvement"])


def evaluate(
    steps: Steps, params: Any, batches: Iterable[dict[str, np.ndarray]]
) -> dict[str, float]:
    """The objective's eval metrics over the whole eval set (its sums added up over batches):
    for SFT the token-weighted mean cross-entropy over every target token."""
    totals = None
    for batch in batches:
        sums = jax.device_get(steps.eval(params, device_batch(batch, steps.batch_shardings)))
        totals = sums if totals is None else add_sums(steps.objective, totals, sums, np.add)
    if totals is None:
        raise ConfigError("the eval set is empty: check config.data.eval_files.")
    return steps.objective.eval_metrics(totals)


def eval_message(step: int, metrics: dict[str, Any]) -> str:
    if "eval/loss" in metrics:
        text = f"step {step}: eval loss {metrics['eval/loss']:.4f}"
    else:  # online RL: held-out prompts, sampled
        text = f"step {step}: eval reward {metrics['eval/reward']:.4f}, pass@1 " + (
            f"{metrics['eval/pass@1']:.1%}"
        )
        if "eval/pass@k" in metrics:
            text += f", pass@k {metrics['eval/pass@k']:.1%}"
    if "eval/rewards/accuracies" in metrics:
        text += (
            f", rewards/accuracies {metrics['eval/rewards/accuracies']:.1%}, margins "
            f"{metrics['eval/rewards/margins']:.3f}"
        )
    if "eval/accuracy" in metrics:  # a reward model (TRL's RewardTrainer names)
        text += f", accuracy {metrics['eval/accuracy']:.1%}, margin {metrics['eval/margin']:.3f}"
    if "eval/exact_match" in metrics:
        text += f", exact match {metrics['eval/exact_match']:.1%} of {metrics['eval/generated']}"
    if metrics.get("eval/samples"):
        text += "\n" + metrics["eval/samples"]
    return text


# Online RL's report lines: (name, eval metric, format).
_RL_REPORT = (
    ("reward", "eval/reward", ".4f"),
    ("pass@1", "eval/pass@1", ".1%"),
    ("pass@k", "eval/pass@k", ".1%"),
)


def final_report(summary: dict[str, Any]) -> str:
    """What changed over the run, in a few lines: eval loss, exact match, where things are."""
    first, last = summary.get("initial_eval"), summary.get("final_eval")
    lines = [f"finished at step {summary['end_step']} (started at {summary['start_step']})"]
    if first and last and "eval/reward" in first:
        lines += [
            f"eval {name} {first[key]:{form}} -> {last[key]:{form}}"
            for name, key, form in _RL_REPORT
            if key in first and key in last
        ]
    elif first and last:
        lines.append(
            f"eval loss {first['eval/loss']:.4f} -> {last['eval/loss']:.4f} "
            f"({first['eval/loss'] / last['eval/loss']:.1f}x lower)"
        )
        if "eval/rewards/accuracies" in first:
            lines.append(
                f"eval rewards/accuracies {first['eval/rewards/accuracies']:.1%} -> "
                f"{last['eval/rewards/accuracies']:.1%}"
            )
        if "eval/accuracy" in first:
            lines.append(
                f"eval accuracy {first['eval/accuracy']:.1%} -> {last['eval/accuracy']:.1%}"
            )
        if "eval/exact_match" in first:
            lines.append(
                f"exact match of greedy replies {first['eval/exact_match']:.1%} -> "
                f"{last['eval/exact_match']:.1%}"
            )
    if summary.get("best_step", -1) >= 0 and "eval/reward" in (last or first or {}):
        lines.append(
            f"best eval reward {-summary['best_eval_loss']:.4f} at step {summary['best_step']}"
        )
    elif summary.get("best_step", -1) >= 0:
        lines.append(
            f"best eval loss {summary['best_eval_loss']:.4f} at step {summary['best_step']}"
        )
    if summary.get("curves"):
        lines.append(f"curves in {summary['curves']}")
    if summary.get("export"):
        lines.append(f"exported to {summary['export']}")
    return "\n".join(lines)
