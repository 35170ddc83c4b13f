"""The pre-flight planner: compile the train step for candidate meshes, micro-batches and remat
policies from an abstract model (no weights, no accelerator) and say which one to run.

Each candidate's train step is lowered and compiled ahead of time on the devices given (fake CPU
devices stand in for a slice), then read: XLA's memory plan per device, XLA's FLOPs per device,
the bytes each collective moves (parsed from the compiled, partitioned HLO) and the compiler's
"Involuntary full rematerialization" warnings. A roofline turns these into a step time.
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
import ml_collections
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sft_jax import memory_plan, sharding
from sft_jax.compile_plan import AUTO_REMAT, lower_train_step
from sft_jax.errors import ConfigError
from sft_jax.hlo_stats import COLLECTIVES, INVOLUNTARY, collective_bytes, compiler_log
from sft_jax.lora import LoRASpec, trainable_filter
from sft_jax.memory_plan import StepMemory
from sft_jax.metrics import peak_flops_per_device, training_flops_per_token
from sft_jax.models import CausalLM, ModelConfig
from sft_jax.models.config import DTYPES, from_hf_config
from sft_jax.models.decoder import decoder_linears, use_attention
from sft_jax.models.hf_io import abstract_model, load_hf_config, resolve_model_dir
from sft_jax.models.layers import LoRAParam
from sft_jax.optim import make_optimizer
from sft_jax.step import StepOptions, StepSpec

OVERLAP = "collectives overlap compute fully: step = max(compute, collectives)"


# --- The abstract model ----------------------------------------------------------------------


def model_config(config: ml_collections.ConfigDict, model_dir: str = "") -> ModelConfig:
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
    hf_config = load_hf_config(resolve_model_dir(name))
    return dataclasses.replace(from_hf_config(hf_config), attention="xla")


def abstract_run_model(config: ml_collections.ConfigDict, shape: ModelConfig) -> tuple[Any, Any]:
    """(abstract model with abstract adapters where config.lora asks for them, the filter of
    what trains): the structure of build_model's model, nothing allocated."""
    spec = LoRASpec.from_config(config.lora)
    model = abstract_model(
        shape, dtype=DTYPES[config.model.compute_dtype],
        param_dtype=DTYPES[config.model.param_dtype], quantization=spec.quantization,
    )  # fmt: skip
    if spec.enabled:
        spec = spec.for_model(model)
        for _, name, linear in decoder_linears(model):
            if name not in spec.targets:
                continue
            a_axes, b_axes = (linear.axes[0], "lora_rank"), ("lora_rank", linear.axes[1])
            a = jax.ShapeDtypeStruct((linear.in_features, spec.rank), jnp.float32)
            b = jax.ShapeDtypeStruct((spec.rank, linear.out_features), jnp.float32)
            linear.lora_a = LoRAParam(a, logical_axes=a_axes)
            linear.lora_b = LoRAParam(b, logical_axes=b_axes)
            linear.lora_scale, linear.lora_dropout = spec.scale, spec.dropout
    use_attention(model, "xla")
    return model, trainable_filter(spec)


def adapter_params(model: CausalLM, trainable: Any, full: bool) -> int | None:
    """Trained parameters with LoRA (what training_flops_per_token takes), None for full."""
    if full:
        return None
    return sum(x.size for x in jax.tree.leaves(nnx.to_pure_dict(nnx.state(model, trainable))))


# --- Candidates ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Candidate:
    data: int
    fsdp: int
    tensor: int
    accumulation: int  # config.train.gradient_accumulation_steps
    remat: str

    @property
    def mesh(self) -> str:
        return f"{self.data}x{self.fsdp}x{self.tensor}"

    def flags(self) -> str:
        return (
            f"--config.mesh.data={self.data} --config.mesh.fsdp={self.fsdp} "
            f"--config.mesh.tensor={self.tensor} "
            f"--config.train.gradient_accumulation_steps={self.accumulation} "
            f"--config.model.remat={self.remat}"
        )


def parse_mesh(text: str, devices: int) -> tuple[int, int, int]:
    """'DATAxFSDPxTENSOR' (one may be -1) -> sizes whose product is `devices`."""
    try:
        sizes = [int(s) for s in text.lower().split("x")]
    except ValueError:
        sizes = []
    if len(sizes) != 3 or sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ConfigError(f"mesh {text!r}: expected DATAxFSDPxTENSOR, e.g. 2x4x1 (one may be -1).")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes and devices % known == 0:
        sizes[sizes.index(-1)] = devices // known
    if math.prod(sizes) != devices:
        options = ", ".join(f"{d}x{f}x{t}" for d, f, t in factorizations(devices)[:8])
        raise ConfigError(
            f"mesh {text!r}: {devices} devices cannot be split into data x fsdp x tensor = "
            f"{' x '.join(str(s) for s in sizes)}; meshes of {devices} devices include "
            f"{options}."
        )
    return sizes[0], sizes[1], sizes[2]


def factorizations(devices: int) -> list[tuple[int, int, int]]:
    """Every (data, fsdp, tensor) whose product is `devices`, tensor parallelism at most 8."""
    divisors = [d for d in range(1, devices + 1) if devices % d == 0]
    return [(devices // (f * t), f, t) for t in divisors if t <= 8 for f in divisors
            if devices % (f * t) == 0]  # fmt: skip


def candidates(
    devices: int,
    rows: int,
    shape: ModelConfig,
    meshes: Sequence[tuple[int, int, int]] = (),
    accumulations: Sequence[int] = (),
    remats: Sequence[str] = AUTO_REMAT,
) -> list[Candidate]:
    """Candidates in the order the search tries them for each mesh: least recomputation first,
    then fewest micro-batches. Meshes whose tensor axis does not divide the key/value heads,
    and micro-batches the global batch cannot split over the mesh's rows, are left out."""
    meshes = list(meshes) or [m for m in factorizations(devices) if shape.num_kv_heads % m[2] == 0]
    out = []
    for data, fsdp, tensor in meshes:
        shards = data * fsdp
        steps = accumulations or [k for k in range(1, rows + 1) if rows % (k * shards) == 0]
        usable = [k for k in steps if rows % (k * shards) == 0]
        out += [Candidate(data, fsdp, tensor, k, r) for r in remats for k in usable]
    return out


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
    model_flops: float  # per device per step, 6N + attention (sft_jax.metrics)
    collective_buffer: dict[str, float]  # full-buffer bytes per device per step, by kind
    collective_wire: dict[str, float]  # bytes sent per device per step, ring algorithms
    involuntary_remats: int  # the compiler's "Involuntary full rematerialization" warnings
    hardware: Hardware

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
    frozen_pair = (sharding.abstract_params(model, mesh, frozen),
                   sharding.param_shardings(model, mesh, frozen))  # fmt: skip
    return (state, state_shardings), frozen_pair


def compile_candidate(
    config: ml_collections.ConfigDict,
    model: Any,
    trainable: Any,
    candidate: Candidate,
    devices: Sequence[jax.Device],
) -> tuple[Any, list[str]]:
    """(the compiled train step of `candidate`, the compiler's log lines while compiling)."""
    mesh = sharding.make_mesh(candidate.data, candidate.fsdp, candidate.tensor, devices)
    model.remat = candidate.remat
    train = config.train
    tx, schedule = make_optimizer(train)
    options = StepOptions(candidate.accumulation, train.z_loss_weight, train.loss_chunk_size,
                          dropout_seed=train.seed)  # fmt: skip
    graphdef = nnx.split(model, trainable, ...)[0]
    spec = StepSpec(graphdef, tx, schedule, options.objective(), candidate.accumulation,
                    options.dropout_seed)  # fmt: skip
    state, frozen = _abstract_inputs(model, mesh, tx, trainable)
    with jax.set_mesh(mesh), compiler_log() as log_lines:
        lowered = lower_train_step(spec, mesh, state, frozen, rows=train.global_batch_size,
                                   seq_len=config.data.max_length)  # fmt: skip
        compiled = lowered.compile()
    return compiled, log_lines


def estimate(
    config: ml_collections.ConfigDict,
    model: Any,
    trainable: Any,
    candidate: Candidate,
    devices: Sequence[jax.Device],
    hardware: Hardware,
) -> Estimate:
    """Compiles `candidate` and reads its memory, FLOPs, collectives and warnings."""
    compiled, log_lines = compile_candidate(config, model, trainable, candidate, devices)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost or {}
    buffer, wire = collective_bytes(compiled.as_text(), len(devices))
    full = not LoRASpec.from_config(config.lora).enabled
    seq_len = config.data.max_length
    per_token = training_flops_per_token(
        model.config, seq_len, adapter_params(model, trainable, full)
    )
    tokens = config.train.global_batch_size * seq_len
    return Estimate(
        candidate, StepMemory.of(compiled), float(cost.get("flops", 0.0)),
        per_token * tokens / len(devices), buffer, wire,
        sum(INVOLUNTARY in line for line in log_lines), hardware,
    )  # fmt: skip


# --- The search and its recommendation ------------------------------------------------------


def search(
    config: ml_collections.ConfigDict,
    shape: ModelConfig,
    devices: Sequence[jax.Device],
    hardware: Hardware,
    found: list[Candidate],
    exhaustive: bool = False,
    report: Any = None,
) -> list[Estimate]:
    """Estimates of the candidates; unless `exhaustive`, a mesh's later candidates (more
    recomputation, more micro-batches) are skipped once one of them fits without warnings."""
    model, trainable = abstract_run_model(config, shape)
    done: set[str] = set()
    out = []
    for candidate in found:
        if candidate.mesh in done:
            continue
        result = estimate(config, model, trainable, candidate, devices, hardware)
        out.append(result)
        if report is not None:
            report(result)
        if result.fits and not result.involuntary_remats and not exhaustive:
            done.add(candidate.mesh)
    return out


def recommend(estimates: Sequence[Estimate]) -> Estimate:
    """The fastest predicted step among the candidates that fit without involuntary
    rematerialization (ties: less memory); a ConfigError naming the closest where none fits."""
    clean = [e for e in estimates if e.fits and not e.involuntary_remats]
    if clean:
        return min(clean, key=lambda e: (e.step_seconds, e.memory_bytes))
    closest = sorted(estimates, key=lambda e: e.memory_bytes)[:3]
    limit = estimates[0].hardware.memory_bytes if estimates else None
    what = "; ".join(_needs(e) for e in closest)
    room = size(memory_plan.FIT_FRACTION * limit) if limit else "the device"
    raise ConfigError(
        f"no candidate fits {room} per device (95% of --device_memory) without involuntary "
        f"rematerialization. The closest: {what or 'none compiled'}. "
        f"{memory_plan.lower_it('auto')}"
    )


def size(count: float) -> str:
    """Bytes in the largest binary unit that keeps a digit before the point."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= scale:
            return f"{count / scale:.3g} {unit}"
    return f"{count:.0f} B"


def _needs(e: Estimate) -> str:
    c = e.candidate
    warned = (
        f", {e.involuntary_remats} involuntary rematerializations" if e.involuntary_remats else ""
    )
    return (
        f"mesh {c.mesh}, {c.accumulation} micro-batches, remat {c.remat}: "
        f"{size(e.memory_bytes)} per device{warned}"
    )


def table(estimates: Sequence[Estimate]) -> str:
    """One row per candidate: memory, FLOPs, collective GiB by kind, the roofline."""
    short = [f"{s} GiB" for s in ("AG", "RS", "AR", "A2A", "CP")]
    head = ["mesh DxFxT", "accum", "remat", "GiB/dev", "fits", "TFLOP xla", "model", *short,
            "compute ms", "comm ms", "step ms", "inv.remat"]  # fmt: skip
    rows = [head]
    for e in estimates:
        c = e.candidate
        rows.append([
            c.mesh, str(c.accumulation), c.remat, f"{e.memory_bytes / 2**30:.3g}",
            "yes" if e.fits else "no", f"{e.xla_flops / 1e12:.3g}",
            f"{e.model_flops / 1e12:.3g}",
            *[f"{e.collective_buffer[k] / 2**30:.3g}" for k in COLLECTIVES],
            f"{1e3 * e.compute_seconds:.3g}", f"{1e3 * e.collective_seconds:.3g}",
            f"{1e3 * e.step_seconds:.3g}", str(e.involuntary_remats),
        ])  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = [" | ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def plan(
    config: ml_collections.ConfigDict,
    devices: Sequence[jax.Device],
    hardware: Hardware,
    *,
    model_dir: str = "",
    meshes: Sequence[str] = (),
    accumulations: Sequence[int] = (),
    remats: Sequence[str] = (),
    exhaustive: bool = False,
    report: Any = None,
) -> tuple[list[Estimate], Estimate]:
    """(every estimate, the recommended one) for `config` on `devices`: the whole planner."""
    shape = model_config(config, model_dir)
    requested = config.model.remat
    remats = remats or (AUTO_REMAT if requested == "auto" else (requested,))
    sizes = [parse_mesh(m, len(devices)) for m in meshes]
    found = candidates(len(devices), config.train.global_batch_size, shape, sizes,
                       accumulations, remats)  # fmt: skip
    if not found:
        raise ConfigError(
            f"config.train.global_batch_size={config.train.global_batch_size}: no candidate mesh "
            f"of {len(devices)} devices splits it (with the micro-batches asked for) over its "
            "data x fsdp axes; use a multiple of the device count."
        )
    estimates = search(config, shape, devices, hardware, found, exhaustive, report)
    return estimates, recommend(estimates)


def apply_choice(config: ml_collections.ConfigDict, choice: Candidate) -> ml_collections.ConfigDict:
    """A copy of `config` with the candidate's mesh, micro-batches and remat policy."""
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.mesh.data, config.mesh.fsdp, config.mesh.tensor = (
            choice.data, choice.fsdp, choice.tensor,
        )  # fmt: skip
        config.train.gradient_accumulation_steps = choice.accumulation
        config.model.remat = choice.remat
    return config


DEFAULT_INTERCONNECT = 100e9  # bytes/s per device where config.mesh.auto must assume one


def auto_config(config: ml_collections.ConfigDict) -> tuple[ml_collections.ConfigDict, str]:
    """config.mesh.auto: (the config with the planner's recommended mesh, micro-batches and
    remat policy for this job's devices, why). Every process compiles the same candidates
    against the same (least) device memory, so all choose alike."""
    peak = peak_flops_per_device(config.log.peak_tflops_per_device) or 989e12
    limit = memory_plan.device_bytes_limit()
    hardware = Hardware(limit, peak, DEFAULT_INTERCONNECT)
    estimates, best = plan(config, jax.devices(), hardware)
    room = f"{limit / 2**30:.1f} GiB" if limit else "memory of unknown size"
    why = (
        f"config.mesh.auto: the planner's pick of {len(estimates)} compiled candidates, the "
        f"fastest roofline step ({1e3 * best.step_seconds:.3g} ms) that fits {room} per device "
        f"({size(best.memory_bytes)}) without involuntary rematerialization; "
        f"{best.candidate.accumulation} micro-batches, remat {best.candidate.remat}"
    )
    return apply_choice(config, best.candidate), why


def mesh_summary(mesh: Mesh) -> str:
    """'data=2 fsdp=2 expert=1 tensor=2: 8 cpu devices in 1 process'."""
    axes = " ".join(f"{name}={size}" for name, size in mesh.shape.items())
    kind = mesh.devices.flat[0].platform
    processes = len({d.process_index for d in mesh.devices.flat})
    return f"{axes}: {mesh.size} {kind} devices in {processes} process{'es' * (processes > 1)}"
