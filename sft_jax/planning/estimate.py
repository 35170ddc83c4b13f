"""One candidate of the pre-flight planner, compiled and read: the abstract model (no weights),
its train step compiled ahead of time on a mesh, and what XLA says of it (memory per device,
FLOPs, bytes per collective kind, involuntary rematerialization), shallow depths extrapolated
to the full one (sft_jax.planning.depth). sft_jax.planning.search chooses which candidates to
compile.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import huggingface_hub
import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sft_jax.adapters.lora import LoRASpec
from sft_jax.core.errors import ConfigError
from sft_jax.core.spec import RunSpec
from sft_jax.models import TRAINABLE, CausalLM, ModelConfig
from sft_jax.models.config import DTYPES, from_hf_config
from sft_jax.models.decoder import use_attention
from sft_jax.models.io.hf import abstract_model, load_hf_config, resolve_model_dir
from sft_jax.models.kernels.grouped_matmul import STAND_IN as STAND_IN_EXPERTS
from sft_jax.models.moe import use_grouped_matmul
from sft_jax.objectives import registry
from sft_jax.planning import depth as plan_depth
from sft_jax.planning.hlo_stats import INVOLUNTARY, collective_bytes, compiler_log
from sft_jax.planning.vision_plan import planned_flops_per_token
from sft_jax.train import memory as memory_plan
from sft_jax.train import sharding
from sft_jax.train.compiled import lower_train_step, run_optimizer
from sft_jax.train.kernel_choice import choose_attention, forced_attention
from sft_jax.train.memory import StepMemory
from sft_jax.train.setup import add_adapters, image_options, moe_options
from sft_jax.train.step import StepOptions, StepSpec

OVERLAP = "collectives overlap compute fully: step = max(compute, collectives)"
# CPU XLA has no bfloat16 matmul: it converts the operands to float32, and keeps float32 copies of
# weights alive across loops and layers, which an accelerator never makes. A bfloat16 run
# planned for an accelerator on CPU is therefore compiled in float32 and read back as bfloat16.
WIDENED = (
    "precision: bfloat16 compiled as float32 on CPU (whose XLA copies bf16 weights to f32 for "
    "its matmuls); read back as bf16: state at its real dtypes, temporaries halved, collectives "
    "halved where the weights are bf16"
)


# --- The abstract model ----------------------------------------------------------------------


def model_config(config: RunSpec, model_dir: str = "") -> ModelConfig:
    """The model's shape from its Hugging Face config.json (read from `model_dir`, else from
    config.model.name_or_path); no weights are read."""
    name = model_dir or config.model.name_or_path
    if not Path(name).expanduser().is_dir() and not name.startswith((".", "/", "~")):
        try:  # a hub id: its config.json alone, never the weights
            name = str(Path(huggingface_hub.hf_hub_download(name, "config.json")).parent)
        except Exception as e:
            raise ConfigError(
                f"{name}: its config.json could not be fetched from the Hugging Face hub "
                f"({type(e).__name__}); pass --model_config=DIR, a directory with config.json."
            ) from e
    return from_hf_config(load_hf_config(resolve_model_dir(name)))


STAND_IN = "blockwise"  # what the CPU compiles for a fused kernel (models/kernels/blockwise.py)


def planned_attention(config: RunSpec, shape: ModelConfig, target: str) -> tuple[str, str]:
    """(the attention the planner compiles, a line saying what the target runs): the target's
    choice for config.model.attention (kernel_choice.choose_attention); a fused kernel that
    this machine cannot compile is planned with the blockwise stand-in, whose residuals and
    blocks take the memory of a flash kernel, never the einsum's [T, S] scores."""
    forced = forced_attention(config, shape)
    if forced is not None:
        return forced[0], f"attention: {forced[0]} on the target and in the plan ({forced[1]})"
    kind, why = choose_attention(
        config.model.attention,
        accelerator=target,
        model=shape,
        compute_dtype=config.model.compute_dtype,
        max_length=registry.row_length(config),
        context=config.mesh.context,
    )
    here = jax.devices()[0].platform
    if kind in ("cudnn", "splash") and {"cudnn": "gpu", "splash": "tpu"}[kind] != here:
        return STAND_IN, f"attention: {kind} on the target, planned with the {STAND_IN} stand-in"
    return kind, f"attention: {kind} on the target and in the plan ({why})"


def planned_experts(shape: ModelConfig, target: str) -> tuple[str, str]:
    """(the grouped matmul the planner compiles, a line saying so; "" for a dense model).
    XLA:CPU lowers ragged_dot to a dense product per local expert over every token copy
    ([experts, rows, width] temporaries a GPU/TPU grouped-GEMM kernel never holds), so an MoE is
    planned with the stand-in of models/grouped_matmul.py, whose temporaries are a kernel's
    (its measured peak on CPU: benchmarks/plan_memory.py moe_lora)."""
    del target
    if not shape.num_experts:
        return "ragged_dot", ""
    return (
        STAND_IN_EXPERTS,
        f"experts: ragged_dot on the target, planned with the {STAND_IN_EXPERTS} stand-in "
        "(XLA:CPU's ragged_dot is a dense product per local expert)",
    )


def abstract_run_model(
    config: RunSpec,
    shape: ModelConfig,
    attention: str = "xla",
    experts: str = "ragged_dot",
) -> tuple[Any, Any]:
    """(abstract model with the run's adapters, the filter of what trains): build_model's
    structure and partition (model_setup.add_adapters, traced: nothing allocated)."""
    model = abstract_model(
        shape,
        dtype=DTYPES[config.model.compute_dtype],
        param_dtype=DTYPES[config.model.param_dtype],
        quantization=LoRASpec.from_config(config.lora).quantization,
    )
    trainable = []

    def with_adapters(model: CausalLM) -> CausalLM:
        # Shapes only: each candidate's shardings come from the logical axes later.
        trainable.append(add_adapters(model, config, sharding.single_device_mesh())[1])
        return model

    model = nnx.eval_shape(with_adapters, model)
    use_attention(model, attention)
    use_grouped_matmul(model, experts)
    return model, trainable[0]


def adapter_params(model: CausalLM, trainable: Any) -> int | None:
    """Trained parameters where the base is frozen (adapters, prompt methods: what
    training_flops_per_token takes), None where every parameter trains."""
    count = lambda which: sum(x.size for x in jax.tree.leaves(nnx.state(model, which)))  # noqa: E731
    trained = count(trainable)
    return None if trained == count(TRAINABLE) else trained


@dataclasses.dataclass(frozen=True)
class Candidate:
    data: int
    fsdp: int
    tensor: int
    expert: int
    accumulation: int  # config.train.gradient_accumulation_steps
    remat: str
    context: int = 1  # config.mesh.context: devices each row's tokens are split over

    @property
    def mesh(self) -> str:
        """DATAxFSDPxTENSOR, or DATAxFSDPxEXPERTxTENSOR where the expert axis splits; with
        ' ctxC' where the sequence is split over C devices."""
        split = f" ctx{self.context}" if self.context > 1 else ""
        if self.expert == 1:
            return f"{self.data}x{self.fsdp}x{self.tensor}{split}"
        return f"{self.data}x{self.fsdp}x{self.expert}x{self.tensor}{split}"

    @property
    def row_shards(self) -> int:
        """The devices a batch's rows are split over (sharding.batch_shards)."""
        return self.data * self.fsdp * self.expert

    def flags(self) -> str:
        return (
            f"--config.mesh.data={self.data} --config.mesh.fsdp={self.fsdp} "
            f"--config.mesh.expert={self.expert} --config.mesh.tensor={self.tensor} "
            f"--config.mesh.context={self.context} "
            f"--config.train.gradient_accumulation_steps={self.accumulation} "
            f"--config.model.remat={self.remat}"
        )


# --- One candidate, compiled ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Hardware:
    """What the roofline assumes of a device."""

    memory_bytes: int | None  # None: unknown (everything fits)
    peak_flops: float  # per device, FLOP/s
    interconnect_bytes: float  # per device, bytes/s each way


@dataclasses.dataclass
class Estimate:
    candidate: Candidate
    memory: StepMemory | None
    xla_flops: float  # per device per step, XLA's cost analysis
    model_flops: float  # per device per step, 6N + attention (sft_jax.train.flops)
    collective_buffer: dict[str, float]  # full-buffer bytes per device per step, by kind
    collective_wire: dict[str, float]  # bytes sent per device per step, ring algorithms
    involuntary_remats: int  # the compiler's "Involuntary full rematerialization" warnings
    hardware: Hardware
    depths: tuple[int, int] | None = None  # compiled at these depths and extrapolated; None: whole
    layers: int = 0  # the model's depth, which every figure is for

    @property
    def memory_bytes(self) -> int:
        return self.memory.total if self.memory else 0

    @property
    def fits(self) -> bool:
        return memory_plan.fits(self.memory, self.hardware.memory_bytes)

    @property
    def compute_seconds(self) -> float:
        return max(self.xla_flops, self.model_flops) / self.hardware.peak_flops

    @property
    def collective_seconds(self) -> float:
        return sum(self.collective_wire.values()) / self.hardware.interconnect_bytes

    @property
    def step_seconds(self) -> float:
        return max(self.compute_seconds, self.collective_seconds)  # see OVERLAP


def _abstract_inputs(model: Any, mesh: Mesh, tx: Any, trainable: Any) -> tuple[Any, Any]:
    """((abstract state, its shardings), (abstract frozen variables, their shardings))."""
    params = sharding.abstract_params(model, mesh, trainable)
    param_shardings = sharding.param_shardings(model, mesh, trainable)
    opt_state = jax.eval_shape(tx.init, params)
    opt_shardings = sharding.opt_state_shardings(opt_state, param_shardings, mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    state_shardings = {"step": replicated, "params": param_shardings, "opt_state": opt_shardings}
    state = {
        "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
        "params": params,
        "opt_state": sharding.with_shardings(opt_state, opt_shardings),
    }
    frozen = nnx.Not(trainable)
    frozen_pair = (
        sharding.abstract_params(model, mesh, frozen),
        sharding.param_shardings(model, mesh, frozen),
    )
    return (state, state_shardings), frozen_pair


def candidate_mesh(candidate: Candidate, devices: Sequence[jax.Device]) -> Mesh:
    return sharding.make_mesh(
        candidate.data,
        candidate.fsdp,
        candidate.tensor,
        devices,
        expert=candidate.expert,
        context=candidate.context,
    )


def state_bytes(config: RunSpec, model: Any, trainable: Any, mesh: Mesh) -> int:
    """Bytes of one device's shards of the weights and optimizer state on `mesh`, counted from
    their shardings without compiling: a floor under the step's memory."""
    return sum(state_parts(config, model, trainable, mesh).values())


def state_parts(config: RunSpec, model: Any, trainable: Any, mesh: Mesh) -> dict[str, int]:
    """state_bytes by part: "params" (trained), "opt_state" (the run's optimizer: AdamW's
    moments, AdaLoRA's allocator), "frozen" (the rest of the weights)."""
    tx, _ = run_optimizer(config)
    (state, _), (frozen, _) = _abstract_inputs(model, mesh, tx, trainable)
    parts = {"params": state["params"], "opt_state": state["opt_state"], "frozen": frozen}
    return {name: shard_bytes(tree) for name, tree in parts.items()}


def shard_bytes(tree: Any) -> int:
    """Bytes of one device's shards of a tree of (abstract or real) sharded arrays."""
    return sum(
        math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree)
    )


def compile_candidate(
    config: RunSpec,
    model: Any,
    trainable: Any,
    candidate: Candidate,
    devices: Sequence[jax.Device],
) -> tuple[Any, list[str]]:
    """(the compiled train step of `candidate`, the compiler's log lines while compiling)."""
    mesh = candidate_mesh(candidate, devices)
    model.remat = candidate.remat
    train = config.train
    tx, schedule = run_optimizer(config)
    options = StepOptions(
        candidate.accumulation,
        train.z_loss_weight,
        train.loss_chunk_size,
        dropout_seed=train.seed,
        **moe_options(train, model.config) | image_options(config, model.config),
    )
    graphdef = nnx.split(model, trainable, ...)[0]
    spec = StepSpec(
        graphdef, tx, schedule, options.objective(), candidate.accumulation, options.dropout_seed
    )
    state, frozen = _abstract_inputs(model, mesh, tx, trainable)
    with jax.set_mesh(mesh), compiler_log() as log_lines:
        lowered = lower_train_step(
            spec,
            mesh,
            state,
            frozen,
            rows=train.global_batch_size,
            seq_len=registry.row_length(config),
        )
        compiled = memory_plan.compile_as_planned(lowered)
    return compiled, log_lines


@dataclasses.dataclass(frozen=True)
class Reading:
    """What one compiled train step says of itself, per device."""

    memory: StepMemory | None
    xla_flops: float
    buffer: dict[str, float]
    wire: dict[str, float]
    involuntary_remats: int

    @classmethod
    def compile(
        cls, subject: Subject, layers: int, candidate: Candidate, devices: Sequence[jax.Device]
    ) -> Reading:
        """`candidate` compiled with `layers` layers of the subject's model, and read."""
        model, trainable = subject.model(layers)
        compiled, log_lines = compile_candidate(
            subject.compiled_config, model, trainable, candidate, devices
        )
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost or {}
        buffer, wire = collective_bytes(compiled.as_text(), len(devices))
        warned = sum(INVOLUNTARY in line for line in log_lines)
        reading = cls(StepMemory.of(compiled), float(cost.get("flops", 0.0)), buffer, wire, warned)
        if subject.widened:
            return reading.narrowed(subject, layers, candidate_mesh(candidate, devices))
        return reading

    def narrowed(self, subject: Subject, layers: int, mesh: Mesh) -> Reading:
        """A float32 compile's reading as the bfloat16 run's (see WIDENED): the state at its
        real dtypes (exact, from the shardings), temporaries halved, and collectives halved
        where the weights are bfloat16."""
        real = state_bytes(subject.config, *subject.model(layers, as_run=True), mesh)
        wide = state_bytes(subject.compiled_config, *subject.model(layers), mesh)
        memory, ratio = self.memory, real / wide
        if memory is not None:
            memory = StepMemory(
                memory.arguments - wide + real,
                round(memory.outputs * ratio),
                round(memory.aliased * ratio),
                memory.temporaries // 2,
                memory.code,
            )
        share = 0.5 if subject.config.model.param_dtype == "bfloat16" else 1.0
        halve = lambda kinds: {k: share * v for k, v in kinds.items()}  # noqa: E731
        return Reading(
            memory, self.xla_flops, halve(self.buffer), halve(self.wire), self.involuntary_remats
        )

    def extended(self, deeper: Reading, d1: int, d2: int, depth: int) -> Reading:
        """The reading at `depth` layers from this one (d1 layers) and `deeper` (d2)."""
        return Reading(
            plan_depth.memory(self.memory, deeper.memory, d1, d2, depth),
            plan_depth.line(self.xla_flops, deeper.xla_flops, d1, d2, depth),
            plan_depth.per_kind(self.buffer, deeper.buffer, d1, d2, depth),
            plan_depth.per_kind(self.wire, deeper.wire, d1, d2, depth),
            max(self.involuntary_remats, deeper.involuntary_remats),
        )


@dataclasses.dataclass
class Subject:
    """What the planner plans: the run's config, the model's full shape and the attention it
    compiles; abstract models of each depth are built once and shared by the candidates."""

    config: RunSpec
    shape: ModelConfig
    attention: str = "xla"
    extrapolate: bool = True  # compile two shallow depths (plan_depth.depths), extrapolate
    widened: bool = False  # bfloat16 compiled as float32 (see WIDENED)
    experts: str = "ragged_dot"  # the grouped matmul compiled (planned_experts)
    _models: dict[tuple[int, bool], tuple[Any, Any]] = dataclasses.field(default_factory=dict)

    @property
    def compiled_config(self) -> RunSpec:
        """The config the CPU compiles: the run's, its bfloat16 dtypes float32 if widened."""
        if not self.widened:
            return self.config
        model = self.config.model
        return self.config.with_values(
            {
                f"model.{field}": "float32"
                for field in ("param_dtype", "compute_dtype")
                if getattr(model, field) == "bfloat16"
            }
        )

    def model(self, layers: int, as_run: bool = False) -> tuple[Any, Any]:
        """(abstract model of `layers` layers as compiled, or with the run's dtypes, the
        filter of what trains)."""
        key = (layers, as_run or not self.widened)
        if key not in self._models:
            shape = plan_depth.truncated(self.shape, layers)
            config = self.config if key[1] else self.compiled_config
            self._models[key] = abstract_run_model(config, shape, self.attention, self.experts)
        return self._models[key]

    @property
    def depths(self) -> tuple[int, int] | None:
        return plan_depth.depths(self.shape) if self.extrapolate else None


def estimate(
    subject: Subject,
    candidate: Candidate,
    devices: Sequence[jax.Device],
    hardware: Hardware,
) -> Estimate:
    """Compiles `candidate` (whole, or at two depths whose readings are extrapolated to the
    model's) and reads its memory, FLOPs, collectives and warnings."""
    config, layers, at = subject.config, subject.shape.num_layers, subject.depths
    if at is None:
        reading = Reading.compile(subject, layers, candidate, devices)
    else:
        shallow, deep = (Reading.compile(subject, d, candidate, devices) for d in at)
        reading = shallow.extended(deep, *at, layers)
    model, trainable = subject.model(layers, as_run=True)  # abstract: counting costs nothing
    seq_len = registry.row_length(config)
    per_token = planned_flops_per_token(config, model, trainable, adapter_params(model, trainable))
    tokens = config.train.global_batch_size * seq_len
    return Estimate(
        candidate,
        reading.memory,
        reading.xla_flops,
        per_token * tokens / len(devices),
        reading.buffer,
        reading.wire,
        reading.involuntary_remats,
        hardware,
        at,
        layers,
    )
