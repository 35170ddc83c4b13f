"""AdaLoRA: SVD-form adapters whose rank budget is reallocated while training, as PEFT's AdaLoRA.

Each adapted linear layer holds P = lora_a [in, r], Lambda = lora_e [r] and Q = lora_b [r, out]
(models/layers.Linear). Two optax transformations do the rest, inside the jitted step:
- `orthogonality_gradient` adds the gradient of orth_reg_weight * mean over the P and Q matrices
  of ||P^T P - I||_F (||Q Q^T - I||_F), PEFT's regulariser added to the loss.
- `rank_allocation` wraps AdamW: after each update it smooths the importance |w * grad| of every
  adapter entry (EMA beta1 of it, EMA beta2 of its deviation: sensitivity and uncertainty),
  scores each triplet (P column, lambda, Q row) by the mean of sensitivity x uncertainty, and on
  the steps of PEFT's budget schedule zeroes the lambdas of the lowest-scoring triplets so that
  `budget` of them stay. Pruning is a mask (no shape changes); the EMAs, the mask and the step
  are the transformation's state, so they live in opt_state and in every checkpoint.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

ADAPTER_KEYS = ("lora_a", "lora_e", "lora_b")


@dataclasses.dataclass(frozen=True)
class AdaLoRASpec:
    """PEFT's AdaLoraConfig fields (init_r is config.lora.rank); steps are optimizer updates."""

    init_r: int
    target_r: int
    tinit: int
    tfinal: int
    delta_t: int
    beta1: float
    beta2: float
    orth_reg_weight: float
    total_step: int


def budget_schedule(spec: AdaLoRASpec, step: int, matrices: int) -> tuple[int, bool]:
    """(kept triplets over all `matrices` adapted layers, whether step `step` prunes), with
    PEFT's RankAllocator.budget_schedule formula: init_r * matrices for tinit steps, a cubic
    decrease to target_r * matrices, held for the last tfinal steps."""
    initial, target = spec.init_r * matrices, spec.target_r * matrices
    if step <= spec.tinit:
        return initial, False
    if step > spec.total_step - spec.tfinal:
        return target, True
    remaining = 1 - (step - spec.tinit) / (spec.total_step - spec.tfinal - spec.tinit)
    return int((initial - target) * (remaining**3) + target), step % spec.delta_t == 0


def _schedule_table(spec: AdaLoRASpec, matrices: int) -> tuple[np.ndarray, np.ndarray]:
    """budget_schedule for steps 0..total_step, computed once on the host (float64, as PEFT)."""
    rows = [budget_schedule(spec, step, matrices) for step in range(spec.total_step + 1)]
    return np.array([b for b, _ in rows], np.int32), np.array([m for _, m in rows], bool)


# --- Adapters in a params tree ---------------------------------------------------------------


def _is_svd_layer(node: Any) -> bool:
    return isinstance(node, dict) and all(key in node for key in ADAPTER_KEYS)


def svd_layers(tree: Any) -> dict[tuple, dict[str, Any]]:
    """{path to a layer: {"lora_a", "lora_e", "lora_b"}} for every AdaLoRA layer of a params tree
    (a pure dict, as the train state holds it), in a fixed order."""
    found: dict[tuple, dict[str, Any]] = {}

    def walk(node: Any, path: tuple) -> None:
        if _is_svd_layer(node):
            found[path] = {key: node[key] for key in ADAPTER_KEYS}
        elif isinstance(node, dict):
            for key in sorted(node, key=str):
                walk(node[key], (*path, key))

    walk(tree, ())
    return found


def _nest(flat: dict[tuple, Any]) -> dict[Any, Any]:
    """{path: value} -> nested dicts (the params tree's structure, so shardings match)."""
    root: dict[Any, Any] = {}
    for path, value in flat.items():
        node = root
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return root


def _flat(nested: dict[Any, Any], paths: list[tuple]) -> dict[tuple, Any]:
    values = {}
    for path in paths:
        node = nested
        for key in path:
            node = node[key]
        values[path] = node
    return values


# --- Orthogonality regulariser -----------------------------------------------------------------


def orthogonality_penalty(params: Any) -> jax.Array:
    """Mean over every P and Q of ||P^T P - I||_F and ||Q Q^T - I||_F (PEFT's regu_loss)."""
    terms = []
    for layer in svd_layers(params).values():
        for name, gram in (("lora_a", "ir,is->rs"), ("lora_b", "ro,so->rs")):
            matrix = layer[name].astype(jnp.float32)
            product = jnp.einsum(gram, matrix, matrix)
            terms.append(jnp.linalg.norm(product - jnp.eye(product.shape[0]), "fro"))
    return sum(terms) / max(len(terms), 1)


def orthogonality_gradient(weight: float) -> optax.GradientTransformation:
    """Adds weight * d(orthogonality_penalty)/d(params) to the gradients (before clipping, as
    when the penalty is part of the loss)."""

    def update(grads: Any, state: optax.EmptyState, params: Any = None):
        penalty_grads = jax.grad(orthogonality_penalty)(params)
        return jax.tree.map(
            lambda g, p: g + weight * p.astype(g.dtype), grads, penalty_grads
        ), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


# --- Rank allocation ---------------------------------------------------------------------------


class RankAllocationState(NamedTuple):
    """Updates done, EMA of importance and of its uncertainty per adapter entry, the triplets
    kept (per layer, [rank] bool, under the layer's path: "lora_e"), and the inner state."""

    count: jax.Array
    sensitivity: Any
    uncertainty: Any
    keep: Any
    inner: Any


def rank_allocation(
    inner: optax.GradientTransformation, spec: AdaLoRASpec
) -> optax.GradientTransformation:
    """`inner` (AdamW) followed by PEFT's RankAllocator.update_and_allocate at each step."""

    def init(params: Any) -> RankAllocationState:
        layers = svd_layers(params)
        zeros = {
            p: {k: jnp.zeros(v.shape, jnp.float32) for k, v in layer.items()}
            for p, layer in layers.items()
        }
        keep = {
            (*p, "lora_e"): jnp.ones(layer["lora_e"].shape, bool) for p, layer in layers.items()
        }
        return RankAllocationState(
            jnp.zeros((), jnp.int32), _nest(zeros), _nest(zeros), _nest(keep), inner.init(params)
        )

    def update(grads: Any, state: RankAllocationState, params: Any = None):
        updates, inner_state = inner.update(grads, state.inner, params)
        layers = svd_layers(params)
        paths = list(layers)
        budgets, prunes = _schedule_table(spec, len(paths))
        step = state.count
        end = spec.total_step - spec.tfinal  # the last allocation; the pattern is then fixed
        updated = svd_layers(optax.apply_updates(params, updates))
        layer_grads = svd_layers(grads)
        sensitivity = _flat(state.sensitivity, paths)
        uncertainty = _flat(state.uncertainty, paths)
        for path in paths:
            for key in ADAPTER_KEYS:
                importance = jnp.abs(updated[path][key] * layer_grads[path][key]).astype(
                    jnp.float32
                )
                smooth = spec.beta1 * sensitivity[path][key] + (1 - spec.beta1) * importance
                unsure = spec.beta2 * uncertainty[path][key] + (1 - spec.beta2) * jnp.abs(
                    importance - smooth
                )
                live = step < end  # PEFT stops updating the scores at the last allocation
                sensitivity[path][key] = jnp.where(live, smooth, sensitivity[path][key])
                uncertainty[path][key] = jnp.where(live, unsure, uncertainty[path][key])
        index = jnp.minimum(step, spec.total_step)
        allocate = jnp.asarray(prunes)[index] | (step == end)
        keep = {path: _flat(state.keep, [(*path, "lora_e")])[(*path, "lora_e")] for path in paths}
        scores = {path: triplet_scores(sensitivity[path], uncertainty[path]) for path in paths}
        fresh = keep_within_budget(scores, jnp.asarray(budgets)[index])
        keep = {path: jnp.where(allocate, fresh[path], keep[path]) for path in paths}
        zero_now = allocate | (step > end)
        updates = _zero_pruned(updates, params, keep, zero_now)
        new_state = RankAllocationState(
            step + 1,
            _nest(sensitivity),
            _nest(uncertainty),
            _nest({(*p, "lora_e"): k for p, k in keep.items()}),
            inner_state,
        )
        return updates, new_state

    return optax.GradientTransformation(init, update)


def triplet_scores(sensitivity: dict[str, jax.Array], uncertainty: dict[str, jax.Array]):
    """Score of each triplet [rank]: its lambda's sensitivity x uncertainty plus the mean of
    those of its P column and of its Q row."""
    score = {key: sensitivity[key] * uncertainty[key] for key in ADAPTER_KEYS}
    return score["lora_e"] + score["lora_a"].mean(axis=0) + score["lora_b"].mean(axis=1)


def keep_within_budget(scores: dict[tuple, jax.Array], budget: jax.Array) -> dict[tuple, jax.Array]:
    """Per layer, the triplets scoring above the (total - budget)-th lowest score of all layers
    (PEFT's kthvalue threshold; ties at it are pruned too); all of them at full budget."""
    every = jnp.concatenate(list(scores.values()))
    pruned = every.shape[0] - budget
    threshold = jnp.where(pruned > 0, jnp.sort(every)[jnp.maximum(pruned - 1, 0)], -jnp.inf)
    return {path: score > threshold for path, score in scores.items()}


def _zero_pruned(updates: Any, params: Any, keep: dict[tuple, jax.Array], zero_now: jax.Array):
    """Updates that leave every pruned lambda exactly 0 (param + (-param)) when zero_now."""
    flat_updates = dict(svd_layers(updates))
    flat_params = svd_layers(params)
    replaced = {}
    for path, layer in flat_updates.items():
        value = flat_params[path]["lora_e"]
        zeroing = jnp.where(keep[path], layer["lora_e"], -value)
        replaced[(*path, "lora_e")] = jnp.where(zero_now, zeroing, layer["lora_e"])
    return _replace(updates, replaced)


def _replace(tree: Any, values: dict[tuple, Any]) -> Any:
    def at(path: tuple, node: Any) -> Any:
        if path in values:
            return values[path]
        if isinstance(node, dict):
            return {key: at((*path, key), child) for key, child in node.items()}
        return node

    return at((), tree)


def find_state(opt_state: Any) -> RankAllocationState | None:
    """The rank allocator's state inside an optimizer state (None without AdaLoRA)."""
    leaves = jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, RankAllocationState))
    return next((x for x in leaves if isinstance(x, RankAllocationState)), None)
