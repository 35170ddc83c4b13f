"""The train and eval steps: pure functions of (state, frozen variables, batch).

The train state is a plain pytree {"step", "params", "opt_state"} of the *trainable*
variables (all parameters, or with LoRA only the adapters); frozen variables (the base model
under LoRA, quantized storage) are a separate argument, never donated, never checkpointed. The
model's structure (graphdef) and the objective are static, in a StepSpec. sft_jax.train.compiled
jits these functions once, with explicit shardings; nothing here knows the mesh's shape.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import PartitionSpec

from sft_jax.core.batch import FIELDS, TOKEN
from sft_jax.models.partitioning import (
    CONTEXT_AXIS,
    LOGICAL_RULES,
    context_layout,
    context_shards,
)
from sft_jax.objectives.loss import CrossEntropy
from sft_jax.objectives.moe import RouterLosses

Batch = dict[str, jax.Array]


def token_layout(batch: Batch) -> Batch:
    """The batch with its per-token arrays in the context axis's order (context_layout);
    per-segment and per-row arrays as they are (core/batch.py)."""
    tokens = {k: v for k, v in batch.items() if FIELDS[k].kind == TOKEN}
    return {**batch, **context_layout(tokens)}


class Objective(Protocol):
    """What a train step optimizes; see sft_jax.objectives.loss.CrossEntropy, the SFT objective.
    Sums add up over micro-batches and eval batches (add_sums), unless the objective says how."""

    def sums(self, model: Any, batch: Batch, dropout_key: jax.Array | None = None) -> Any: ...
    def normalizer(self, batch: Batch) -> jax.Array: ...
    def loss(self, sums: Any, normalizer: jax.Array) -> jax.Array: ...
    def metrics(self, sums: Any, normalizer: jax.Array) -> dict[str, Any]: ...
    def eval_metrics(self, sums: Any) -> dict[str, float]: ...


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """What shapes the compiled train step."""

    gradient_accumulation_steps: int = 1
    z_loss_weight: float = 0.0
    loss_chunk_size: int = 512
    dropout_seed: int = 0  # LoRA dropout masks derive from (seed, step, micro-batch)
    # Mixtures of experts: the decoder layers with experts (none: a dense model), the weight of
    # the load-balancing loss and of the router z-loss.
    moe_layers: tuple[int, ...] = ()
    router_aux_loss_coef: float = 0.0
    router_z_loss_weight: float = 0.0
    # An image-text model's image fields and their per-row shapes (CrossEntropy.images).
    images: tuple[tuple[str, tuple[int, ...]], ...] = ()

    def objective(self, inner: Objective | None = None) -> Objective:
        """`inner` (default: SFT's cross-entropy), with the router's losses on a mixture of
        experts (objectives/moe.RouterLosses)."""
        inner = inner or CrossEntropy(self.z_loss_weight, self.loss_chunk_size, self.images)
        if not self.moe_layers:
            return inner
        return RouterLosses(
            inner,
            self.moe_layers,
            self.router_aux_loss_coef,
            self.router_z_loss_weight,
            self.gradient_accumulation_steps,
        )


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """The static half of a step: model structure, optimizer, objective, accumulation."""

    graphdef: nnx.GraphDef
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    objective: Objective
    accumulation: int = 1
    dropout_seed: int = 0


def micro_batches(batch: Batch, k: int) -> Batch:
    """[G, T] -> [k, G/k, T] (a per-row [G] -> [k, G/k]), micro-batch j holding rows j, j+k,
    ...: every device keeps an equal share of every micro-batch (traced under the mesh: rows
    stay on their devices)."""
    spec = (None, LOGICAL_RULES["batch"], CONTEXT_AXIS if context_shards() > 1 else None)

    def split(x: jax.Array) -> jax.Array:
        rows = x.shape[0]
        x = jnp.swapaxes(x.reshape(rows // k, k, *x.shape[1:]), 0, 1)
        return jax.lax.with_sharding_constraint(x, PartitionSpec(*spec[: x.ndim]))

    return {key: split(x) for key, x in batch.items()}


def add_sums(objective: Objective, a: Any, b: Any, add: Any = jnp.add) -> Any:
    """The sums of two batches as one (objective.add_sums where it has one: minima, maxima)."""
    own = getattr(objective, "add_sums", None)
    return own(a, b) if own is not None else jax.tree.map(add, a, b)


def gradients(
    spec: StepSpec, params: Any, frozen: Any, batch: Batch, step_key: jax.Array
) -> tuple[Any, Any]:
    """(gradients of the objective's loss, its sums) over the batch, in spec.accumulation
    micro-batches whose gradients add up in float32; the loss is divided once, by the
    objective's normalizer of the whole batch."""
    normalizer = spec.objective.normalizer(batch)

    def loss_of(params: Any, micro: Batch, key: jax.Array) -> tuple[jax.Array, Any]:
        sums = spec.objective.sums(nnx.merge(spec.graphdef, params, frozen), micro, key)
        return spec.objective.loss(sums, normalizer), sums

    grad_fn = jax.grad(loss_of, has_aux=True)
    if spec.accumulation == 1:
        return grad_fn(params, batch, step_key)

    def accumulate(carry, micro_and_index):
        grads_acc, sums_acc = carry
        micro, index = micro_and_index
        grads, sums = grad_fn(params, micro, jax.random.fold_in(step_key, index))
        grads_acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grads_acc, grads)
        return (grads_acc, add_sums(spec.objective, sums_acc, sums)), None

    micro = micro_batches(batch, spec.accumulation)
    first = jax.tree.map(lambda x: x[0], micro)
    sums_shape = jax.eval_shape(lambda: loss_of(params, first, step_key)[1])
    no_sums = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), sums_shape)
    zeros = (
        jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params),
        getattr(spec.objective, "no_sums", lambda zeros: zeros)(no_sums),
    )
    (grads, sums), _ = jax.lax.scan(accumulate, zeros, (micro, jnp.arange(spec.accumulation)))
    return jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params), sums


def train_step(
    spec: StepSpec, state: dict[str, Any], frozen: Any, batch: Batch
) -> tuple[dict[str, Any], dict[str, Any]]:
    """One optimizer update: (new state, metrics of this step)."""
    step_key = jax.random.fold_in(jax.random.key(spec.dropout_seed), state["step"])
    params = state["params"]
    batch = token_layout(batch)
    grads, sums = gradients(spec, params, frozen, batch, step_key)
    updates, opt_state = spec.tx.update(grads, state["opt_state"], params)
    new_state = {
        "step": state["step"] + 1,
        "params": optax.apply_updates(params, updates),
        "opt_state": opt_state,
    }
    metrics = spec.objective.metrics(sums, spec.objective.normalizer(batch)) | {
        "train/grad_norm": optax.global_norm(grads),
        "train/learning_rate": spec.schedule(state["step"]),
    }
    return new_state, metrics


def eval_step(spec: StepSpec, params: Any, frozen: Any, batch: Batch) -> Any:
    """The objective's sums over an eval batch (no dropout); the caller adds them up."""
    batch = token_layout(batch)
    return spec.objective.sums(nnx.merge(spec.graphdef, params, frozen), batch, None)


def reference_step(spec: StepSpec, params: Any, frozen: Any, batch: Batch) -> jax.Array:
    """The objective's reference log-probs of a batch, [rows, T] (DPO with a precomputed
    reference: run once over the data with the initial weights)."""
    batch = token_layout(batch)
    return spec.objective.reference_token_logps(nnx.merge(spec.graphdef, params, frozen), batch)


def rollout_logps_step(
    spec: StepSpec, params: Any, frozen: Any, batch: Batch
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The policy's and the reference's log-probs of a rollout's tokens and the policy's
    entropy, [rows, T] each (online RL: once per rollout, with the params that sampled it)."""
    batch = token_layout(batch)
    return spec.objective.rollout_logps(nnx.merge(spec.graphdef, params, frozen), batch)
