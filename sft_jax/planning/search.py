"""The pre-flight planner: compile the train step for candidate meshes, micro-batches and remat
policies from an abstract model (no weights, no accelerator) and say which one to run.

Each candidate's train step is lowered and compiled ahead of time on the devices given (fake CPU
devices stand in for a slice), then read: XLA's memory plan per device, XLA's FLOPs per device,
the bytes each collective moves (parsed from the compiled, partitioned HLO) and the compiler's
"Involuntary full rematerialization" warnings. A roofline turns these into a step time. Deep
models are compiled at two shallow depths and extrapolated (sft_jax.planning.depth); where the
target runs a fused attention kernel the CPU cannot compile, models/blockwise.py, whose memory
is the kernel's, stands in for it (and models/grouped_matmul.py for the experts' ragged_dot:
plan_estimate.planned_experts); meshes whose weights and optimizer state
alone overflow the device are not compiled.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
from jax.sharding import Mesh

from sft_jax.core.errors import ConfigError
from sft_jax.core.spec import RunSpec
from sft_jax.models import ModelConfig
from sft_jax.planning.estimate import (
    WIDENED,
    Candidate,
    Estimate,
    Hardware,
    Subject,
    candidate_mesh,
    estimate,
    model_config,
    planned_attention,
    planned_experts,
    state_bytes,
)
from sft_jax.train import memory as memory_plan
from sft_jax.train.compiled import AUTO_REMAT
from sft_jax.train.flops import peak_flops_per_device
from sft_jax.train.kernel_choice import accelerator

# --- Candidates ------------------------------------------------------------------------------


def parse_mesh(text: str, devices: int) -> tuple[int, int, int, int]:
    """'DATAxFSDPxTENSOR' or 'DATAxFSDPxEXPERTxTENSOR' (one may be -1) -> (data, fsdp, tensor,
    expert) whose product is `devices`."""
    try:
        sizes = [int(s) for s in text.lower().split("x")]
    except ValueError:
        sizes = []
    if len(sizes) not in (3, 4) or sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ConfigError(
            f"mesh {text!r}: expected DATAxFSDPxTENSOR or DATAxFSDPxEXPERTxTENSOR, e.g. 2x4x1 "
            "(one may be -1)."
        )
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes and devices % known == 0:
        sizes[sizes.index(-1)] = devices // known
    if math.prod(sizes) != devices:
        options = ", ".join(f"{d}x{f}x{t}" for d, f, t, _ in factorizations(devices)[:8])
        raise ConfigError(
            f"mesh {text!r}: {devices} devices cannot be split into the mesh "
            f"{' x '.join(str(s) for s in sizes)}; meshes of {devices} devices include "
            f"{options}."
        )
    if len(sizes) == 3:
        return sizes[0], sizes[1], sizes[2], 1
    return sizes[0], sizes[1], sizes[3], sizes[2]


def factorizations(devices: int, experts: int = 0) -> list[tuple[int, int, int, int]]:
    """Every (data, fsdp, tensor, expert) whose product is `devices`: tensor parallelism at
    most 8, the expert axis (a mixture of `experts` experts) a divisor of the experts."""
    divisors = [d for d in range(1, devices + 1) if devices % d == 0]
    expert_sizes = [e for e in divisors if experts and experts % e == 0] or [1]
    return [
        (devices // (f * t * e), f, t, e)
        for e in expert_sizes
        for t in divisors
        if t <= 8
        for f in divisors
        if devices % (f * t * e) == 0
    ]


def candidates(
    devices: int,
    rows: int,
    shape: ModelConfig,
    meshes: Sequence[tuple[int, int, int, int]] = (),
    accumulations: Sequence[int] = (),
    remats: Sequence[str] = AUTO_REMAT,
    context: int = 1,
) -> list[Candidate]:
    """Candidates in the order the search tries them for each mesh: least recomputation first,
    then fewest micro-batches. Meshes whose tensor axis does not divide the key/value heads (or
    whose expert axis does not divide the experts), and micro-batches the global batch cannot
    split over the mesh's rows, are left out. With `context` > 1 each row's tokens are split
    over that many devices and `devices` counts the rest (the devices / context the other
    axes split)."""
    meshes = list(meshes) or [
        m for m in factorizations(devices, shape.num_experts) if shape.num_kv_heads % m[2] == 0
    ]
    out = []
    for data, fsdp, tensor, expert in meshes:
        shards = data * fsdp * expert
        steps = accumulations or [k for k in range(1, rows + 1) if rows % (k * shards) == 0]
        usable = [k for k in steps if rows % (k * shards) == 0]
        out += [
            Candidate(data, fsdp, tensor, expert, k, r, context) for r in remats for k in usable
        ]
    return out


def context_sizes(config: RunSpec, devices: int, contexts: Sequence[int]) -> list[int]:
    """The context axis sizes to plan: `contexts`, else config.mesh.context. Each must divide
    the devices and split every row into 2 x context equal chunks (causal load balancing)."""
    contexts = list(contexts) or [config.mesh.context]
    max_length = config.data.max_length
    for context in contexts:
        if context < 1 or devices % context or max_length % (2 * context):
            raise ConfigError(
                f"context={context}: the context axis must divide the {devices} devices, and "
                f"2 x context must divide config.data.max_length={max_length} (two chunks per "
                "device, for an equal share of causal work); choose another."
            )
    return contexts


# --- The search and its recommendation ------------------------------------------------------


@dataclasses.dataclass
class Outcome:
    """What the planner found: every compiled estimate, the recommended one, what attention it
    planned with, and the meshes left uncompiled because their state alone does not fit."""

    estimates: list[Estimate]
    best: Estimate
    attention: str  # e.g. "attention: cudnn on the target, planned with the blockwise stand-in"
    precision: str  # how the dtypes were compiled (plan_estimate.WIDENED), or ""
    too_small: dict[str, int]  # mesh -> bytes of weights and optimizer state per device
    experts: str = ""  # e.g. "experts: ragged_dot on the target, planned with the ..."; "" dense
    schedule: tuple[str, ...] = ()  # schedule_notes: figures that are XLA:CPU's schedule


# XLA:CPU's memory-optimized scheduler may put layers' weight-gradient matmuls after the whole
# backward pass (only the optimizer reads them), keeping every layer's recomputed activations
# and cotangents alive until then: remat undone. Whether it does depends on the program: a tiny
# Llama (8 rows x 1024 tokens, remat full) plans 94 MiB of temporaries per layer at 1
# micro-batch but 14.5 MiB at 2 micro-batches of the same 8 rows (tests/planning/
# test_schedule_note.py); a tiny Gemma 4 141 MiB at both; Gemma 4 E2B (16 x 4096) 565 GiB at 1
# micro-batch, 31.7 GiB at 2. XLA:CPU does run them so (the two Llama steps grow the process by
# 504 and 220 MiB for 483 and 202 planned), but an accelerator's scheduler orders the step
# itself. Optimization barriers do not prevent it (XLA:CPU drops them before it schedules), nor
# does a data dependency (it moved both Llama programs to 43 MiB per layer). The planner cannot
# tell what an accelerator keeps; where candidates of one mesh and remat policy disagree by more
# than SUSPECT per micro-batch row, it says that the larger figure is this schedule's.
SUSPECT = 2.0


def schedule_notes(estimates: Sequence[Estimate]) -> list[str]:
    """A line for each remat candidate whose temporaries per micro-batch row exceed SUSPECT
    times the least of the candidates of its mesh and remat policy."""
    per_row: dict[tuple[str, str], float] = {}
    for e in estimates:
        if e.memory is not None and e.candidate.remat != "none":
            key = (e.candidate.mesh, e.candidate.remat)
            rows = e.memory.temporaries * e.candidate.accumulation  # the batch is the same
            per_row[key] = min(per_row.get(key, rows), rows)
    notes = []
    for e in estimates:
        key = (e.candidate.mesh, e.candidate.remat)
        least = per_row.get(key, 0)
        if e.memory is None or not least or key[1] == "none":
            continue
        ratio = e.memory.temporaries * e.candidate.accumulation / least
        if ratio > SUSPECT:
            notes.append(
                f"schedule: mesh {key[0]}, {e.candidate.accumulation} micro-batches, remat "
                f"{key[1]} plans {ratio:.3g}x the temporaries per micro-batch row of the least "
                "of its mesh: XLA:CPU's schedule there keeps recomputed activations until the "
                "weight gradients at the end of the backward pass (remat undone); an "
                "accelerator's scheduler need not (not verified), so its "
                f"{size(e.memory_bytes)} may overstate the step"
            )
    return notes


def search(
    subject: Subject,
    devices: Sequence[jax.Device],
    hardware: Hardware,
    found: list[Candidate],
    exhaustive: bool = False,
    report: Any = None,
) -> tuple[list[Estimate], dict[str, int]]:
    """(estimates of the candidates, meshes skipped -> their state bytes per device). Meshes
    whose weights and optimizer state alone exceed the device are not compiled; unless
    `exhaustive`, a mesh's later candidates (more recomputation, more micro-batches) are
    skipped once one of them fits without warnings."""
    done: set[str] = set()
    too_small: dict[str, int] = {}
    out = []
    for candidate in found:
        if candidate.mesh in done:
            continue
        if hardware.memory_bytes and candidate.mesh not in too_small:
            mesh = candidate_mesh(candidate, devices)
            real = subject.model(subject.shape.num_layers, as_run=True)
            floor = state_bytes(subject.config, *real, mesh)
            if floor > memory_plan.FIT_FRACTION * hardware.memory_bytes:
                too_small[candidate.mesh] = floor
                done.add(candidate.mesh)
                continue
        result = estimate(subject, candidate, devices, hardware)
        out.append(result)
        if report is not None:
            report(result)
        if result.fits and not result.involuntary_remats and not exhaustive:
            done.add(candidate.mesh)
    return out, too_small


def recommend(
    estimates: Sequence[Estimate],
    too_small: dict[str, int] | None = None,
    limit: int | None = None,
) -> Estimate:
    """The fastest predicted step among the candidates that fit without involuntary
    rematerialization (ties: less memory); a ConfigError naming the closest where none fits."""
    clean = [e for e in estimates if e.fits and not e.involuntary_remats]
    if clean:
        return min(clean, key=lambda e: (e.step_seconds, e.memory_bytes))
    closest = sorted(estimates, key=lambda e: e.memory_bytes)[:3]
    limit = limit or (estimates[0].hardware.memory_bytes if estimates else None)
    skipped = sorted((too_small or {}).items(), key=lambda item: item[1])[:3]
    what = "; ".join(
        [_needs(e) for e in closest]
        + [
            f"mesh {mesh}: weights and optimizer state alone {size(floor)} per device"
            for mesh, floor in skipped
        ]
    )
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


def plan(
    config: RunSpec,
    devices: Sequence[jax.Device],
    hardware: Hardware,
    *,
    model_dir: str = "",
    meshes: Sequence[str] = (),
    accumulations: Sequence[int] = (),
    remats: Sequence[str] = (),
    exhaustive: bool = False,
    report: Any = None,
    target: str = "nvidia",
    extrapolate: bool = True,
    contexts: Sequence[int] = (),
) -> Outcome:
    """The whole planner, for `config` on `devices`, as the `target` accelerator ('nvidia',
    'tpu', 'cpu': which attention kernel it runs) would run it; the sequence split over each
    of `contexts` devices (default config.mesh.context), the rest searched over the others."""
    shape = model_config(config, model_dir)
    attention, attention_line = planned_attention(config, shape, target)
    experts, experts_line = planned_experts(shape, target)
    requested = config.model.remat
    remats = remats or (AUTO_REMAT if requested == "auto" else (requested,))
    found = []
    for context in context_sizes(config, len(devices), contexts):
        rest = len(devices) // context  # the devices the other axes split
        sizes = [parse_mesh(m, rest) for m in meshes]
        found += candidates(
            rest, config.train.global_batch_size, shape, sizes, accumulations, remats, context
        )
    if not found:
        raise ConfigError(
            f"config.train.global_batch_size={config.train.global_batch_size}: no candidate mesh "
            f"of {len(devices)} devices splits it (with the micro-batches asked for) over its "
            "data x fsdp x expert axes; use a multiple of the device count."
        )
    widened = (
        target != "cpu"
        and devices[0].platform == "cpu"
        and config.model.compute_dtype == "bfloat16"
    )
    subject = Subject(config, shape, attention, extrapolate, widened, experts)
    estimates, too_small = search(subject, devices, hardware, found, exhaustive, report)
    best = recommend(estimates, too_small, hardware.memory_bytes)
    precision = WIDENED if widened else ""
    note = tuple(schedule_notes(estimates)) if devices[0].platform == "cpu" else ()
    return Outcome(estimates, best, attention_line, precision, too_small, experts_line, note)


def apply_choice(config: RunSpec, choice: Candidate) -> RunSpec:
    """A copy of `config` with the candidate's mesh, micro-batches and remat policy."""
    return config.with_values(
        {
            "mesh.data": choice.data,
            "mesh.fsdp": choice.fsdp,
            "mesh.tensor": choice.tensor,
            "mesh.expert": choice.expert,
            "mesh.context": choice.context,
            "train.gradient_accumulation_steps": choice.accumulation,
            "model.remat": choice.remat,
        }
    )


DEFAULT_INTERCONNECT = 100e9  # bytes/s per device where config.mesh.auto must assume one


def auto_config(config: RunSpec) -> tuple[RunSpec, str]:
    """config.mesh.auto: (the config with the planner's recommended mesh, micro-batches and
    remat policy for this job's devices, why). Every process compiles the same candidates
    against the same (least) device memory, so all choose alike."""
    peak = peak_flops_per_device(config.log.peak_tflops_per_device) or 989e12
    limit = memory_plan.device_bytes_limit()
    hardware = Hardware(limit, peak, DEFAULT_INTERCONNECT)
    outcome = plan(config, jax.devices(), hardware, target=accelerator())
    estimates, best = outcome.estimates, outcome.best
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
