"""Optimizer and learning-rate schedule from the `train` config section (optax)."""

from __future__ import annotations

from typing import Any

import jax
import optax

from sft_jax.adapters.adalora import AdaLoRASpec, orthogonality_gradient, rank_allocation
from sft_jax.core.errors import check_choice
from sft_jax.core.spec import TrainSpec

SCHEDULES = ("cosine", "linear", "constant")


def learning_rate_schedule(train: TrainSpec) -> optax.Schedule:
    """Linear warmup from 0 to learning_rate, then cosine / linear decay or constant."""
    check_choice("train.lr_schedule", train.lr_schedule, SCHEDULES)
    peak, warmup = train.learning_rate, train.warmup_steps
    final = peak * train.min_lr_ratio
    decay_steps = max(train.steps - warmup, 1)
    warmup_fn = optax.linear_schedule(0.0, peak, max(warmup, 1))
    if train.lr_schedule == "cosine":
        decay_fn = optax.cosine_decay_schedule(peak, decay_steps, alpha=train.min_lr_ratio)
    elif train.lr_schedule == "linear":
        decay_fn = optax.linear_schedule(peak, final, decay_steps)
    else:
        decay_fn = optax.constant_schedule(peak)
    if warmup == 0:
        return decay_fn
    return optax.join_schedules([warmup_fn, decay_fn], [warmup])


def decay_mask(params: Any) -> Any:
    """Weight decay applies to matrices only: never to norm scales or biases (1-D)."""
    return jax.tree.map(lambda x: x.ndim >= 2, params)


def make_optimizer(
    train: TrainSpec, adalora: AdaLoRASpec | None = None
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with global-norm clipping; returns the transformation and its schedule. With
    AdaLoRA, the orthogonality regulariser's gradient is added first (it is part of the loss,
    so it is clipped with it) and AdamW's updates pass through the rank allocator."""
    schedule = learning_rate_schedule(train)
    parts = []
    if adalora is not None:
        parts.append(orthogonality_gradient(adalora.orth_reg_weight))
    if train.max_grad_norm > 0:
        parts.append(optax.clip_by_global_norm(train.max_grad_norm))
    parts.append(
        optax.adamw(
            schedule,
            b1=train.adam_b1,
            b2=train.adam_b2,
            eps=train.adam_eps,
            weight_decay=train.weight_decay,
            mask=decay_mask,
        )
    )
    if adalora is not None:
        parts[-1] = rank_allocation(parts[-1], adalora)
    return optax.chain(*parts), schedule
