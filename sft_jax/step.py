"""Train and eval steps: pure functions of (state, batch), compiled once with explicit shardings.

The train state is a plain pytree {"step", "params", "opt_state"}; the model's structure
(graphdef) is static. Both steps are compiled ahead of time from abstract inputs, so a batch
of another shape or sharding is an error, never a silent recompilation.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sft_jax import sharding
from sft_jax.loss import LossSums, loss_sums
from sft_jax.models.decoder import CausalLM

BATCH_KEYS = ("input_ids", "target_ids", "target_mask", "positions", "segment_ids")
BATCH_DTYPES = {k: jnp.int32 for k in BATCH_KEYS} | {"target_mask": jnp.bool_}


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """What shapes the compiled train step."""

    gradient_accumulation_steps: int = 1
    z_loss_weight: float = 0.0
    loss_chunk_size: int = 512


def _keystr(path: tuple[Any, ...]) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def param_shardings(model: CausalLM, mesh: Mesh) -> dict[str, Any]:
    """NamedSharding per parameter (a pure dict shaped like the params), from logical axes."""
    flat = {}
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value = variable.get_value()
        flat[path] = sharding.named_sharding(
            variable.get_metadata()["logical_axes"], value.shape, mesh
        )
    return nnx.to_pure_dict(nnx.from_flat_state(flat))


def _opt_state_shardings(abstract_opt_state: Any, params_shardings: Any, mesh: Mesh) -> Any:
    """Leaves mirroring a parameter (Adam moments) take its sharding; the rest replicate."""
    by_path = {
        _keystr(path): s for path, s in jax.tree_util.tree_flatten_with_path(params_shardings)[0]
    }
    replicated = NamedSharding(mesh, PartitionSpec())

    def pick(path: tuple[Any, ...], leaf: jax.ShapeDtypeStruct) -> NamedSharding:
        keys = _keystr(path)
        for start in range(len(keys)):
            match = by_path.get(keys[start:])
            if match is not None and len(match.spec) <= leaf.ndim:
                return match
        return replicated

    return jax.tree_util.tree_map_with_path(pick, abstract_opt_state)


def batch_shardings(mesh: Mesh) -> dict[str, NamedSharding]:
    rows = NamedSharding(mesh, PartitionSpec(sharding.LOGICAL_RULES["batch"], None))
    return {k: rows for k in BATCH_KEYS}


def abstract_batch(rows: int, seq_len: int, mesh: Mesh) -> dict[str, jax.ShapeDtypeStruct]:
    shardings = batch_shardings(mesh)
    return {
        k: jax.ShapeDtypeStruct((rows, seq_len), BATCH_DTYPES[k], sharding=shardings[k])
        for k in BATCH_KEYS
    }


def _micro_batches(batch: dict[str, jax.Array], k: int, mesh: Mesh) -> dict[str, jax.Array]:
    """[G, T] -> [k, G/k, T], micro-batch j holding rows j, j+k, ...: every device keeps an
    equal share of every micro-batch."""
    spec = NamedSharding(mesh, PartitionSpec(None, sharding.LOGICAL_RULES["batch"], None))

    def split(x: jax.Array) -> jax.Array:
        rows = x.shape[0]
        x = jnp.swapaxes(x.reshape(rows // k, k, *x.shape[1:]), 0, 1)
        return jax.lax.with_sharding_constraint(x, spec)

    return {key: split(x) for key, x in batch.items()}


@dataclasses.dataclass
class Steps:
    """Compiled steps and the shardings they expect."""

    train: Any  # (state, batch) -> (state, metrics)
    eval: Any  # (params, batch) -> LossSums
    state_shardings: Any
    batch_shardings: dict[str, NamedSharding]
    compile_seconds: float


def init_state(model: CausalLM, tx: optax.GradientTransformation, mesh: Mesh) -> tuple[Any, Any]:
    """Train state placed on the mesh, and its shardings."""
    shardings = param_shardings(model, mesh)
    params = jax.device_put(nnx.to_pure_dict(nnx.state(model, nnx.Param)), shardings)
    opt_shardings = _opt_state_shardings(jax.eval_shape(tx.init, params), shardings, mesh)
    opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
    replicated = NamedSharding(mesh, PartitionSpec())
    state = {
        "step": jax.device_put(jnp.zeros((), jnp.int32), replicated),
        "params": params,
        "opt_state": opt_state,
    }
    state_shardings = {"step": replicated, "params": shardings, "opt_state": opt_shardings}
    return state, state_shardings


def build_steps(
    model: CausalLM,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    mesh: Mesh,
    state_shardings: Any,
    *,
    train_rows: int,
    eval_rows: int,
    seq_len: int,
    options: StepOptions,
) -> Steps:
    """Compiles the train step (donating the state) and the eval step, once."""
    graphdef = nnx.graphdef(model)
    k = options.gradient_accumulation_steps
    if train_rows % k:
        raise ValueError(
            f"global batch of {train_rows} rows is not divisible into {k} micro-batches."
        )

    def sums_of(params: Any, batch: dict[str, jax.Array]) -> LossSums:
        return loss_sums(nnx.merge(graphdef, params), batch, options.loss_chunk_size)

    def train_step(state: dict[str, Any], batch: dict[str, jax.Array]):
        # One division, by the target tokens of the whole global batch (all devices, all
        # micro-batches): micro-batches of uneven size then weigh exactly right.
        target_tokens = jnp.sum(batch["target_mask"].astype(jnp.float32))
        denominator = jnp.maximum(target_tokens, 1.0)

        def objective(params: Any, micro: dict[str, jax.Array]):
            sums = sums_of(params, micro)
            return (sums.nll + options.z_loss_weight * sums.z) / denominator, sums

        grad_fn = jax.grad(objective, has_aux=True)
        params = state["params"]
        if k == 1:
            grads, sums = grad_fn(params, batch)
        else:

            def accumulate(carry, micro):
                grads_acc, sums_acc = carry
                grads, sums = grad_fn(params, micro)
                grads_acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grads_acc, grads)
                return (
                    grads_acc,
                    LossSums(*(a + b for a, b in zip(sums_acc, sums, strict=True))),
                ), None

            zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
            zero = jnp.zeros((), jnp.float32)
            (grads, sums), _ = jax.lax.scan(
                accumulate, (zeros, LossSums(zero, zero, zero)), _micro_batches(batch, k, mesh)
            )
            grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
        grad_norm = optax.global_norm(grads)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_state = {
            "step": state["step"] + 1,
            "params": optax.apply_updates(params, updates),
            "opt_state": opt_state,
        }
        metrics = {
            "train/loss": sums.nll / denominator,
            "train/z_loss": sums.z / denominator,
            "train/grad_norm": grad_norm,
            "train/target_tokens": target_tokens,
            "train/learning_rate": schedule(state["step"]),
        }
        return new_state, metrics

    replicated = NamedSharding(mesh, PartitionSpec())
    shardings = batch_shardings(mesh)
    abstract_state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        jax.eval_shape(lambda: _abstract_state(model, tx)),
        state_shardings,
    )
    start = time.perf_counter()
    train = (
        jax.jit(
            train_step,
            in_shardings=(state_shardings, shardings),
            out_shardings=(state_shardings, replicated),
            donate_argnums=(0,),
        )
        .lower(abstract_state, abstract_batch(train_rows, seq_len, mesh))
        .compile()
    )
    eval_ = (
        jax.jit(
            sums_of, in_shardings=(state_shardings["params"], shardings), out_shardings=replicated
        )
        .lower(abstract_state["params"], abstract_batch(eval_rows, seq_len, mesh))
        .compile()
    )
    return Steps(train, eval_, state_shardings, shardings, time.perf_counter() - start)


def _abstract_state(model: CausalLM, tx: optax.GradientTransformation) -> dict[str, Any]:
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}


def device_batch(
    local_batch: dict[str, Any], shardings: dict[str, NamedSharding]
) -> dict[str, jax.Array]:
    """This process's rows of the global batch -> global arrays sharded over the mesh."""
    return {
        k: jax.make_array_from_process_local_data(
            shardings[k], local_batch[k].astype(BATCH_DTYPES[k])
        )
        for k in BATCH_KEYS
    }
