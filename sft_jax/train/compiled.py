"""The compile plan: what a run executes, decided once.

`plan_run(config, mesh, model, ...)` takes the checked config, the mesh, the model and the batch
shape and returns a Plan: the jitted train and eval steps with their shardings, the initial
train state, the attention kernel and remat policy it chose (and why), and XLA's memory plan of
the train step. attention='auto', remat='auto' and the memory check are decided here and
nowhere else; the trainer only runs the result.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sft_jax.adapters.lora import LoRASpec
from sft_jax.core.batch import BASE_KEYS
from sft_jax.core.errors import ConfigError
from sft_jax.core.spec import RunSpec
from sft_jax.models import CausalLM
from sft_jax.models.decoder import use_attention
from sft_jax.models.layers import TRAINABLE
from sft_jax.models.moe import use_moe_dispatch
from sft_jax.train import memory as memory_plan
from sft_jax.train import sharding, step
from sft_jax.train.kernel_choice import attention_for, choose_moe_dispatch, segments_bound
from sft_jax.train.memory import StepMemory
from sft_jax.train.optim import make_optimizer
from sft_jax.train.setup import moe_options, objective_for
from sft_jax.train.step import StepOptions, StepSpec

log = logging.getLogger(__name__)

# remat "auto" tries these in turn, least recomputation first (and so most memory).
AUTO_REMAT = ("none", "save_matmuls", "full")


# --- Train state and compiled steps -------------------------------------------------------


@dataclasses.dataclass
class Steps:
    """Compiled steps and the shardings they expect."""

    train: Any  # (state, batch) -> (state, metrics)
    eval: Any  # (params, batch) -> the objective's sums
    state_shardings: Any
    frozen: Any  # the frozen variables both steps read (a pure dict, possibly empty)
    batch_shardings: dict[str, NamedSharding]
    compile_seconds: float
    graphdef: Any = None  # with `frozen`, turns trained params back into a model
    objective: Any = None  # what the steps optimize (its eval_metrics read the eval sums)
    train_memory: StepMemory | None = None  # the train step's planned memory per device
    # (params, this process's rows of an eval-sized batch) -> the reference log-probs of every
    # row of the global batch, [rows, T] on the host: DPO with reference='precomputed'.
    reference: Callable[[Any, dict[str, Any]], np.ndarray] | None = None
    # (params, this process's rows of a train batch) -> (the policy's, the reference's log-probs,
    # the policy's entropy) [rows, T] of every row of the global batch on the host: online RL.
    rollout_logps: Callable[[Any, dict[str, Any]], tuple[np.ndarray, ...]] | None = None

    def model_of(self, params: Any) -> CausalLM:
        """The model with these trained parameters (e.g. to generate with during eval)."""
        return nnx.merge(self.graphdef, params, self.frozen)


def batch_keys(objective: step.Objective) -> tuple[str, ...]:
    """The arrays of the steps' batches: core.batch.BASE_KEYS and the objective's own."""
    return (*BASE_KEYS, *getattr(objective, "batch_keys", ()))


def init_state(
    model: CausalLM, tx: optax.GradientTransformation, mesh: Mesh, trainable: Any = TRAINABLE
) -> tuple[Any, Any]:
    """Train state of the `trainable` variables placed on the mesh, and its shardings."""
    shardings = sharding.param_shardings(model, mesh, trainable)
    params = jax.device_put(nnx.to_pure_dict(nnx.state(model, trainable)), shardings)
    opt_shardings = sharding.opt_state_shardings(jax.eval_shape(tx.init, params), shardings, mesh)
    opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
    replicated = NamedSharding(mesh, PartitionSpec())
    state = {
        "step": jax.device_put(jnp.zeros((), jnp.int32), replicated),
        "params": params,
        "opt_state": opt_state,
    }
    state_shardings = {"step": replicated, "params": shardings, "opt_state": opt_shardings}
    return state, state_shardings


def _abstract_state(model: CausalLM, tx: optax.GradientTransformation, trainable: Any) -> dict:
    params = nnx.to_pure_dict(nnx.state(model, trainable))
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}


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
    trainable: Any = TRAINABLE,
    objective: step.Objective | None = None,
) -> Steps:
    """Compiles step.train_step (donating the state) and step.eval_step, once, ahead of time
    from abstract inputs: a batch of another shape or sharding is an error, never a silent
    recompilation. The objective is SFT's cross-entropy unless given
    (sft_jax.objectives.preference)."""
    graphdef, _, frozen_state = nnx.split(model, trainable, ...)
    frozen_shardings = sharding.param_shardings(model, mesh, nnx.Not(trainable))
    frozen = jax.device_put(nnx.to_pure_dict(frozen_state), frozen_shardings)
    objective = options.objective(objective)  # with the router's losses on an MoE
    spec = StepSpec(
        graphdef, tx, schedule, objective, options.gradient_accumulation_steps, options.dropout_seed
    )
    abstract_state = sharding.with_shardings(
        jax.eval_shape(lambda: _abstract_state(model, tx, trainable)), state_shardings
    )
    batches = sharding.batch_shardings(mesh, batch_keys(objective))
    start = time.perf_counter()
    train, evaluate, reference, rollout_logps = _compile_steps(
        spec,
        mesh,
        (abstract_state, state_shardings),
        (frozen, frozen_shardings),
        (train_rows, eval_rows),
        seq_len,
    )
    return Steps(
        train=lambda state, batch: train(state, frozen, batch),
        eval=lambda params, batch: evaluate(params, frozen, batch),
        state_shardings=state_shardings,
        frozen=frozen,
        batch_shardings=batches,
        compile_seconds=time.perf_counter() - start,
        graphdef=graphdef,
        objective=objective,
        train_memory=StepMemory.of(train),
        reference=reference,
        rollout_logps=rollout_logps,
    )


def _compile_steps(
    spec: StepSpec,
    mesh: Mesh,
    state: tuple[Any, Any],
    frozen: tuple[Any, Any],
    rows: tuple[int, int],
    seq_len: int,
) -> tuple[Any, Any, Any, Any]:
    """The train, eval, reference and rollout log-prob steps compiled: state (abstract state,
    shardings), frozen (the frozen variables, shardings), rows (train rows, eval rows)."""
    (abstract_state, state_shardings), (values, frozen_shardings) = state, frozen
    abstract_frozen = sharding.abstract_like(values)
    params = (abstract_state["params"], state_shardings["params"])
    # Traced under the mesh: the loss (sft_jax.objectives.loss) and the fused attention kernels
    # run per shard, in shard_map over it.
    with jax.set_mesh(mesh):
        train = lower_train_step(
            spec, mesh, state, (abstract_frozen, frozen_shardings), rows=rows[0], seq_len=seq_len
        ).compile()
        evaluate = compile_eval(
            spec, mesh, params, (abstract_frozen, frozen_shardings), rows=rows[1], seq_len=seq_len
        )
        host_steps = compile_host_steps(spec, mesh, params, frozen, (*rows, seq_len))
    return train, evaluate, *host_steps


def _lowered(
    function: Callable,
    mesh: Mesh,
    first: tuple[Any, Any],
    frozen: tuple[Any, Any],
    batch: tuple,
    out_shardings: Any,
    donate: tuple[int, ...] = (),
) -> Any:
    """function(first, frozen, batch) jitted with explicit shardings and lowered at abstract
    inputs: first and frozen are (abstract values, shardings); batch is (rows, seq_len, keys[,
    the IMAGE fields' per-row shapes])."""
    rows, seq_len, keys, *per_row = batch
    jitted = jax.jit(
        function,
        in_shardings=(first[1], frozen[1], sharding.batch_shardings(mesh, keys)),
        out_shardings=out_shardings,
        donate_argnums=donate,
    )
    inputs = sharding.abstract_batch(rows, seq_len, mesh, keys, per_row[0] if per_row else None)
    return jitted.lower(first[0], frozen[0], inputs)


def compile_eval(
    spec: StepSpec,
    mesh: Mesh,
    params: tuple[Any, Any],
    frozen: tuple[Any, Any],
    *,
    rows: int,
    seq_len: int,
) -> Any:
    """step.eval_step compiled for batches of rows x seq_len; params and frozen are (abstract
    values, shardings)."""
    batch = (rows, seq_len, batch_keys(spec.objective), getattr(spec.objective, "per_row", {}))
    replicated = NamedSharding(mesh, PartitionSpec())
    eval_step = functools.partial(step.eval_step, spec)
    return _lowered(eval_step, mesh, params, frozen, batch, replicated).compile()


def _host_step(
    step_fn: Callable, mesh: Mesh, params: tuple[Any, Any], frozen: tuple[Any, Any], rows: int
) -> Callable[[Any, dict[str, Any]], Any]:
    """step_fn(params, frozen, batch) compiled for batches of rows x seq_len (base keys, sharded
    like the steps') with its outputs replicated: (params, this process's rows) -> the outputs
    of every row, as NumPy arrays. rows: (rows, seq_len); params, frozen: (abstract values,
    shardings) as for the steps. Call under the mesh."""
    values, frozen_shardings = frozen
    abstract_frozen = (sharding.abstract_like(values), frozen_shardings)
    replicated = NamedSharding(mesh, PartitionSpec())
    keys = (*rows, BASE_KEYS)
    compiled = _lowered(step_fn, mesh, params, abstract_frozen, keys, replicated).compile()
    batches = sharding.batch_shardings(mesh)

    def run(params: Any, local_rows: dict[str, Any]) -> Any:
        out = compiled(params, values, sharding.device_batch(local_rows, batches))
        return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), out)

    return run


def compile_host_steps(
    spec: StepSpec, mesh: Mesh, params: tuple[Any, Any], frozen: tuple[Any, Any], rows: tuple
) -> tuple[Any, Any]:
    """(DPO's reference step: params, rows -> reference log-probs [rows, T], for eval-sized
    batches, where the objective reads a precomputed reference; online RL's rollout step:
    params, rows -> the policy's and the reference's log-probs and the entropy of a train batch,
    where the objective samples its rows), each None where not. rows: (train, eval, seq_len)."""
    reference = rollout = None
    if getattr(spec.objective, "reference", None) == "precomputed":
        step_fn = functools.partial(step.reference_step, spec)
        reference = _host_step(step_fn, mesh, params, frozen, (rows[1], rows[2]))
    if hasattr(spec.objective, "rollout_logps"):
        step_fn = functools.partial(step.rollout_logps_step, spec)
        rollout = _host_step(step_fn, mesh, params, frozen, (rows[0], rows[2]))
    return reference, rollout


def lower_train_step(
    spec: StepSpec,
    mesh: Mesh,
    state: tuple[Any, Any],
    frozen: tuple[Any, Any],
    *,
    rows: int,
    seq_len: int,
) -> Any:
    """step.train_step jitted with explicit shardings (state donated) and lowered for abstract
    (state, frozen) = (ShapeDtypeStructs, shardings) pairs and a batch of rows x seq_len; call
    under jax.set_mesh(mesh). Weights never need to exist: sft_jax.planning.search compiles it
    from an abstract model."""
    batch = (rows, seq_len, batch_keys(spec.objective), getattr(spec.objective, "per_row", {}))
    out = (state[1], NamedSharding(mesh, PartitionSpec()))
    train_step = functools.partial(step.train_step, spec)
    return _lowered(train_step, mesh, state, frozen, batch, out, donate=(0,))


# --- Remat and the attention fall-back ---------------------------------------------------


def auto_remat_policies() -> tuple[str, ...]:
    """AUTO_REMAT, with "offload" (matmul outputs kept in host memory: no recomputation, less
    device memory) tried before "full" where the backend can offload."""
    if not memory_plan.host_offload_supported():
        return AUTO_REMAT
    return (*AUTO_REMAT[:-1], "offload", AUTO_REMAT[-1])


def compile_with_remat(
    build: Callable[[CausalLM], Steps], model: CausalLM, remat: str, limit: int | None
) -> Steps:
    """The compiled steps with `remat`. "auto" compiles auto_remat_policies() in turn and keeps
    the first
    whose train step XLA plans within FIT_FRACTION of `limit` bytes per device ("none" where
    the limit is unknown; "full" where none fits); a compile refused for want of memory counts
    as not fitting. No step runs."""
    error, steps = None, None
    for policy in auto_remat_policies() if remat == "auto" else (remat,):
        model.remat = policy
        try:
            steps = build(model)
        except Exception as e:
            if not memory_plan.out_of_memory(e):
                raise
            error, steps = e, None
            log.info("remat %r: the compiler ran out of device memory (%s)", policy, str(e)[:300])
            continue
        if remat != "auto" or memory_plan.fits(steps.train_memory, limit):
            break
        log.info(
            "remat %r: the train step plans %.2f GiB per device, over %.0f%% of %.2f GiB",
            policy,
            steps.train_memory.total / 2**30,
            100 * memory_plan.FIT_FRACTION,
            limit / 2**30,
        )
    if steps is None:
        raise ConfigError(
            f"the train step does not fit in device memory with config.model.remat={remat!r} "
            f"(the compiler: {str(error).splitlines()[0][:300]}). {memory_plan.lower_it(remat)}"
        ) from error
    if remat == "auto":
        log.info("remat: %s (auto: %s)", model.remat, _why_remat(steps.train_memory, limit))
    return steps


def _why_remat(plan: StepMemory | None, limit: int | None) -> str:
    share = f"{100 * memory_plan.FIT_FRACTION:.0f}% of the device"
    if limit is None:
        return "the device's memory is unknown"
    if plan is None:
        return "XLA gives no memory plan here"
    if memory_plan.fits(plan, limit):
        return f"the least recomputation that fits {share}"
    return f"no policy fits {share}; the last one"


def with_attention_fallback(
    build: Callable[[CausalLM], Steps], requested: str
) -> Callable[[CausalLM], Steps]:
    """`build`, but where "auto" picked a fused kernel that does not compile (cuDNN can refuse
    a graph at compile time), the einsum path instead, with a warning. A named kernel fails,
    and so does a step too large for the device (compile_with_remat's business)."""

    def build_or_fall_back(model: CausalLM) -> Steps:
        try:
            return build(model)
        except Exception as e:
            if (
                requested != "auto"
                or model.config.attention == "xla"
                or memory_plan.out_of_memory(e)
            ):
                raise
            log.warning(
                "attention %r did not compile (%s: %s); config.model.attention='auto' "
                "falls back to 'xla'.",
                model.config.attention,
                type(e).__name__,
                str(e)[:500],
            )
            use_attention(model, "xla")
            if getattr(model, "reference", None) is not None:  # DPO's frozen copy
                use_attention(model.reference, "xla")
            return build(model)

    return build_or_fall_back


# --- The entry point -----------------------------------------------------------------------


@dataclasses.dataclass
class Plan:
    """What a run executes, and what was chosen for it."""

    steps: Steps
    state: dict[str, Any]  # the initial train state, on the mesh
    tx: optax.GradientTransformation
    attention: str
    remat: str
    device_limit: int | None  # bytes one device holds; None where unknown (CPU)


def run_optimizer(config: RunSpec) -> tuple[optax.GradientTransformation, Any]:
    """(the run's optimizer, its learning-rate schedule): AdamW, wrapped by AdaLoRA's rank
    allocation and orthogonality gradient where config.lora asks for AdaLoRA."""
    adalora = LoRASpec.from_config(config.lora, config.train.steps).adalora
    return make_optimizer(config.train, adalora)


def plan_run(
    config: RunSpec,
    mesh: Mesh,
    model: CausalLM,
    *,
    seq_len: int,
    max_segments: int = 0,
    trainable: Any = TRAINABLE,
    pad_token_id: int | None = None,
    images: tuple[tuple[str, tuple[int, ...]], ...] = (),
) -> Plan:
    """Chooses the attention kernel and remat policy, compiles the steps, checks the memory.

    max_segments: most segments in a row of the batches (0: the bound of config.data);
    pad_token_id: the tokenizer's (a reward model never reads its score at it); images: the
    data's image fields and their per-row shapes (DataSource.images)."""
    max_segments = max_segments or segments_bound(config.data)
    attention, why = attention_for(config, model.config, max_segments)
    log.info("attention: %s (%s)", attention, why)
    use_attention(model, attention, max_segments)
    if model.config.num_experts:
        dispatch, why = choose_moe_dispatch(config.model.moe_dispatch)
        log.info("expert dispatch: %s (%s)", dispatch, why)
        use_moe_dispatch(model, dispatch)
    train = config.train
    tx, schedule = run_optimizer(config)
    state, state_shardings = init_state(model, tx, mesh, trainable)
    options = StepOptions(
        train.gradient_accumulation_steps,
        train.z_loss_weight,
        train.loss_chunk_size,
        dropout_seed=train.seed,
        **moe_options(train, model.config),
        images=images,
    )
    objective = objective_for(config, model, max_segments, pad_token_id)
    build = functools.partial(
        build_steps,
        tx=tx,
        schedule=schedule,
        mesh=mesh,
        state_shardings=state_shardings,
        train_rows=train.global_batch_size,
        eval_rows=config.eval.global_batch_size,
        seq_len=seq_len,
        options=options,
        trainable=trainable,
        objective=objective,
    )
    limit = memory_plan.device_bytes_limit()
    build = with_attention_fallback(build, config.model.attention)
    steps = compile_with_remat(build, model, config.model.remat, limit)
    log.info("train and eval steps compiled in %.1f s", steps.compile_seconds)
    memory_plan.warn_if_over_memory(steps.train_memory, limit, config.model.remat)
    return Plan(steps, state, tx, model.config.attention, model.remat, limit)
