"""Train and eval steps: pure functions of (state, batch), compiled once with explicit shardings.

The train state is a plain pytree {"step", "params", "opt_state"} of the *trainable*
variables (all parameters, or with LoRA only the adapters); frozen variables (the base model
under LoRA, quantized storage) are a separate argument, never donated, never checkpointed. The
model's structure (graphdef) is static. Both steps are compiled ahead of time from abstract
inputs, so a batch of another shape or sharding is an error, never a silent recompilation.
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
from sft_jax.errors import ConfigError
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
    dropout_seed: int = 0  # LoRA dropout masks derive from (seed, step, micro-batch)


def _keystr(path: tuple[Any, ...]) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def param_shardings(model: CausalLM, mesh: Mesh, which: Any = nnx.Param) -> dict[str, Any]:
    """NamedSharding per variable selected by `which` (a pure dict), from logical axes."""
    flat = {}
    for path, variable in nnx.to_flat_state(nnx.state(model, which)):
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


@dataclasses.dataclass(frozen=True)
class StepMemory:
    """XLA's plan for one device's memory in a compiled step, in bytes (known before it runs)."""

    arguments: int  # state, frozen variables and batch (this device's shards)
    outputs: int
    aliased: int  # outputs written into donated arguments (counted once, in `arguments`)
    temporaries: int  # activations, gradients, logits chunks, ...
    code: int

    @property
    def total(self) -> int:
        return self.arguments + self.outputs - self.aliased + self.temporaries + self.code

    @classmethod
    def of(cls, compiled: Any) -> StepMemory | None:
        """From a compiled executable; None where the backend gives no analysis."""
        stats = compiled.memory_analysis()
        try:  # jax documents the structure as free to change: read what is there
            return cls(
                arguments=int(stats.argument_size_in_bytes),
                outputs=int(stats.output_size_in_bytes),
                aliased=int(stats.alias_size_in_bytes),
                temporaries=int(stats.temp_size_in_bytes),
                code=int(stats.generated_code_size_in_bytes),
            )
        except (AttributeError, TypeError):
            return None

    def describe(self) -> str:
        gib = 2.0**30
        return (
            f"{self.total / gib:.2f} GiB per device: arguments {self.arguments / gib:.2f}, "
            f"temporaries {self.temporaries / gib:.2f}, new outputs "
            f"{(self.outputs - self.aliased) / gib:.2f} (XLA's estimate)"
        )


@dataclasses.dataclass
class Steps:
    """Compiled steps and the shardings they expect."""

    train: Any  # (state, batch) -> (state, metrics)
    eval: Any  # (params, batch) -> LossSums
    state_shardings: Any
    frozen: Any  # the frozen variables both steps read (a pure dict, possibly empty)
    batch_shardings: dict[str, NamedSharding]
    compile_seconds: float
    graphdef: Any = None  # with `frozen`, turns trained params back into a model
    train_memory: StepMemory | None = None  # the train step's planned memory per device

    def model_of(self, params: Any) -> CausalLM:
        """The model with these trained parameters (e.g. to generate with during eval)."""
        return nnx.merge(self.graphdef, params, self.frozen)


def frozen_filter(trainable: Any) -> Any:
    return nnx.Not(trainable)


def init_state(
    model: CausalLM, tx: optax.GradientTransformation, mesh: Mesh, trainable: Any = nnx.Param
) -> tuple[Any, Any]:
    """Train state of the `trainable` variables placed on the mesh, and its shardings."""
    shardings = param_shardings(model, mesh, trainable)
    params = jax.device_put(nnx.to_pure_dict(nnx.state(model, trainable)), shardings)
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
    trainable: Any = nnx.Param,
) -> Steps:
    """Compiles the train step (donating the state) and the eval step, once."""
    graphdef, _, frozen_state = nnx.split(model, trainable, ...)
    frozen_shardings = param_shardings(model, mesh, frozen_filter(trainable))
    frozen = jax.device_put(nnx.to_pure_dict(frozen_state), frozen_shardings)
    k = options.gradient_accumulation_steps
    if train_rows % k:
        raise ConfigError(
            f"global batch of {train_rows} rows is not divisible into {k} micro-batches."
        )

    def sums_of(params: Any, frozen: Any, batch: dict[str, jax.Array], key=None) -> LossSums:
        model = nnx.merge(graphdef, params, frozen)
        return loss_sums(model, batch, options.loss_chunk_size, dropout_key=key)

    def train_step(state: dict[str, Any], frozen: Any, batch: dict[str, jax.Array]):
        # One division, by the target tokens of the whole global batch (all devices, all
        # micro-batches): micro-batches of uneven size then weigh exactly right.
        target_tokens = jnp.sum(batch["target_mask"].astype(jnp.float32))
        denominator = jnp.maximum(target_tokens, 1.0)

        step_key = jax.random.fold_in(jax.random.key(options.dropout_seed), state["step"])

        def objective(params: Any, micro: dict[str, jax.Array], key: jax.Array):
            sums = sums_of(params, frozen, micro, key)
            return (sums.nll + options.z_loss_weight * sums.z) / denominator, sums

        grad_fn = jax.grad(objective, has_aux=True)
        params = state["params"]
        if k == 1:
            grads, sums = grad_fn(params, batch, step_key)
        else:

            def accumulate(carry, micro_and_index):
                grads_acc, sums_acc = carry
                micro, index = micro_and_index
                grads, sums = grad_fn(params, micro, jax.random.fold_in(step_key, index))
                grads_acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grads_acc, grads)
                return (
                    grads_acc,
                    LossSums(*(a + b for a, b in zip(sums_acc, sums, strict=True))),
                ), None

            zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
            zero = jnp.zeros((), jnp.float32)
            micro_batches = (_micro_batches(batch, k, mesh), jnp.arange(k))
            (grads, sums), _ = jax.lax.scan(
                accumulate, (zeros, LossSums(zero, zero, zero)), micro_batches
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
        jax.eval_shape(lambda: _abstract_state(model, tx, trainable)),
        state_shardings,
    )
    abstract_frozen = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), frozen
    )
    start = time.perf_counter()
    # Traced under the mesh: the loss (sft_jax.loss) and the fused attention kernels run per
    # shard, in shard_map over it.
    with jax.set_mesh(mesh):
        train = (
            jax.jit(
                train_step,
                in_shardings=(state_shardings, frozen_shardings, shardings),
                out_shardings=(state_shardings, replicated),
                donate_argnums=(0,),
            )
            .lower(abstract_state, abstract_frozen, abstract_batch(train_rows, seq_len, mesh))
            .compile()
        )
        eval_ = (
            jax.jit(
                sums_of,
                in_shardings=(state_shardings["params"], frozen_shardings, shardings),
                out_shardings=replicated,
            )
            .lower(
                abstract_state["params"], abstract_frozen, abstract_batch(eval_rows, seq_len, mesh)
            )
            .compile()
        )
    return Steps(
        train=lambda state, batch: train(state, frozen, batch),
        eval=lambda params, batch: eval_(params, frozen, batch),
        state_shardings=state_shardings,
        frozen=frozen,
        batch_shardings=shardings,
        compile_seconds=time.perf_counter() - start,
        graphdef=graphdef,
        train_memory=StepMemory.of(train),
    )


def _abstract_state(model: CausalLM, tx: optax.GradientTransformation, trainable: Any) -> dict:
    params = nnx.to_pure_dict(nnx.state(model, trainable))
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
