"""Plans a run before it runs: python -m sft_jax.plan --config=configs/base.py --devices=8

Compiles the train step for candidate meshes (data x fsdp x tensor, and expert for a mixture of
experts), micro-batches (config.train.gradient_accumulation_steps) and remat policies on N
devices (fake CPU devices where the machine has fewer), from the model's config.json alone (no
weights), prints a table (memory, FLOPs, collective bytes and a roofline step time per
candidate) and the flags of the recommended configuration. The context axis (mesh.context,
or each of --contexts) splits every row's tokens; the other axes share the rest.
--accelerator names the target's kind: its fused attention kernel is planned with the
blockwise stand-in (models/blockwise.py).
"""

import os
import sys


def _fake_devices(argv: list[str]) -> None:
    """--devices=N asks XLA for N host devices; it must be set before jax is imported."""
    for arg in argv:
        if arg.startswith("--devices="):
            count = arg.split("=", 1)[1]
            flags = os.environ.get("XLA_FLAGS", "")
            flags = " ".join(f for f in flags.split() if "host_platform_device_count" not in f)
            os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}"
            os.environ.setdefault("JAX_PLATFORMS", "cpu")


if __name__ == "__main__":
    _fake_devices(sys.argv)

import re  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from sft_jax import cli  # noqa: E402
from sft_jax.cli.overrides import unknown_override  # noqa: E402
from sft_jax.core.errors import ConfigError  # noqa: E402
from sft_jax.core.spec import RunSpec  # noqa: E402
from sft_jax.objectives import registry  # noqa: E402
from sft_jax.planning import estimate as plan_estimate  # noqa: E402
from sft_jax.planning import rollout as plan_rollout  # noqa: E402
from sft_jax.planning import search as plan_search  # noqa: E402
from sft_jax.planning import vision_plan  # noqa: E402
from sft_jax.planning.hlo_stats import COLLECTIVES  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True)
flags.DEFINE_integer("devices", 0, "Devices to plan for (0: this machine's).")
flags.DEFINE_string("device_memory", "", "Memory of one device, e.g. 80GB or 16GiB ('': unknown).")
flags.DEFINE_float("peak_tflops", 989.0, "Peak bf16 TFLOP/s of one device (roofline compute).")
flags.DEFINE_float(
    "interconnect_gbps", 100.0, "GB/s (gigabytes) one device sends, for the collectives."
)
flags.DEFINE_string(
    "model_config",
    "",
    "Directory with the model's config.json (default: "
    "config.model.name_or_path); only config.json is read.",
)
flags.DEFINE_enum(
    "accelerator",
    "nvidia",
    ["nvidia", "tpu", "cpu"],
    "The target's kind: which attention kernel config.model.attention gives it.",
)
flags.DEFINE_bool(
    "extrapolate",
    True,
    "Compile deep models at two shallow depths, "
    "extrapolate to the full depth (--noextrapolate: compile whole).",
)
flags.DEFINE_list(
    "meshes", [], "Meshes to try, DATAxFSDPxTENSOR or DATAxFSDPxEXPERTxTENSOR (default: all)."
)
flags.DEFINE_list(
    "contexts",
    [],
    "Context axis sizes to try, each splitting every row's tokens "
    "over that many devices (default: config.mesh.context); --meshes then "
    "split the rest of the devices.",
)
flags.DEFINE_list("accumulation", [], "Micro-batch counts to try (default: all that divide).")
flags.DEFINE_list("remat", [], "Remat policies to try (default: config.model.remat, or all).")
flags.DEFINE_bool(
    "exhaustive", False, "Compile every candidate (default: per mesh, stop at the first that fits)."
)
flags.mark_flags_as_required(["config"])
cli.define_debug_flag()


LEGEND = """\
GiB/dev: XLA's memory plan per device (state, batch, temporaries); fits: within 95% of
--device_memory. TFLOP xla: XLA's cost analysis per device per step (it counts a loop body, such
as each micro-batch of gradient accumulation, once); model: 6 x matmul weights + attention per
token (sft_jax.train.flops), per device. AG/RS/AR/A2A/CP GiB: the full buffers of all-gathers,
reduce-scatters, all-reduces, all-to-alls and collective-permutes per device per step, read from
the compiled HLO (loops times their trips). compute ms: max(xla, model) at --peak_tflops; comm
ms: ring-algorithm bytes each device sends at --interconnect_gbps; step ms: the larger of the two
(full overlap assumed). inv.remat: XLA's 'Involuntary full rematerialization' warnings. layers:
'2,4->32' = compiled with 2 and 4 layers, every figure extrapolated linearly to 32 layers;
'all' = compiled whole."""


def parse_bytes(text: str) -> int | None:
    """'80GB' (10^9), '16GiB' (2^30), '512MB', '' -> None."""
    if not text:
        return None
    match = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?)B?\s*", text, re.IGNORECASE)
    if not match:
        raise ConfigError(f"--device_memory={text!r}: expected a size such as 80GB or 16GiB.")
    power = " KMGT".index(match.group(2).upper() or " ")
    return int(float(match.group(1)) * (1024 if match.group(3) else 1000) ** power)


def _layers(e: plan_estimate.Estimate) -> str:
    if e.depths is None:
        return "all"
    return f"{e.depths[0]},{e.depths[1]}->{e.layers}"


def table(estimates: Sequence[plan_estimate.Estimate]) -> str:
    """One row per candidate: memory, FLOPs, collective GiB by kind, the roofline."""
    short = [f"{s} GiB" for s in ("AG", "RS", "AR", "A2A", "CP")]
    head = [
        "mesh DxFx[E]xT[ ctxC]",
        "accum",
        "remat",
        "GiB/dev",
        "fits",
        "TFLOP xla",
        "model",
        *short,
        "compute ms",
        "comm ms",
        "step ms",
        "inv.remat",
        "layers",
    ]
    rows = [head]
    for e in estimates:
        c = e.candidate
        rows.append(
            [
                c.mesh,
                str(c.accumulation),
                c.remat,
                f"{e.memory_bytes / 2**30:.3g}",
                "yes" if e.fits else "no",
                f"{e.xla_flops / 1e12:.3g}",
                f"{e.model_flops / 1e12:.3g}",
                *[f"{e.collective_buffer[k] / 2**30:.3g}" for k in COLLECTIVES],
                f"{1e3 * e.compute_seconds:.3g}",
                f"{1e3 * e.collective_seconds:.3g}",
                f"{1e3 * e.step_seconds:.3g}",
                str(e.involuntary_remats),
                _layers(e),
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = [" | ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def _vision_lines(config: RunSpec, shape: Any, best: Any, devices: list) -> list[str]:
    """An image-text model's vision part on the recommended mesh (planning/vision_plan.py),
    each line ending in a newline; none for a text model."""
    if shape.vision is None:
        return []
    model, trainable = plan_estimate.abstract_run_model(config, shape)
    mesh = plan_estimate.candidate_mesh(best.candidate, devices)
    lines = vision_plan.report(config, model, trainable, mesh, best.candidate.mesh)
    return [f"{line}\n" for line in lines]


def main(argv: list[str]) -> None:
    del argv
    cli.run_command(_plan)


def _plan() -> None:
    config = RunSpec.of(FLAGS.config)
    devices = jax.devices()
    if FLAGS.devices and FLAGS.devices != len(devices):
        raise ConfigError(
            f"--devices={FLAGS.devices}: jax sees {len(devices)} devices; fake CPU devices are "
            "set up only when jax has not started yet."
        )
    hardware = plan_estimate.Hardware(
        parse_bytes(FLAGS.device_memory), FLAGS.peak_tflops * 1e12, FLAGS.interconnect_gbps * 1e9
    )
    print(
        f"planning {config.model.name_or_path} on {len(devices)} devices; roofline: "
        f"{FLAGS.peak_tflops:g} TFLOP/s, {FLAGS.interconnect_gbps:g} GB/s per device, "
        f"{plan_estimate.OVERLAP}",
        flush=True,
    )
    outcome = plan_search.plan(
        config,
        devices,
        hardware,
        model_dir=FLAGS.model_config,
        meshes=FLAGS.meshes,
        accumulations=[int(k) for k in FLAGS.accumulation],
        remats=FLAGS.remat,
        exhaustive=FLAGS.exhaustive,
        target=FLAGS.accelerator,
        extrapolate=FLAGS.extrapolate,
        contexts=[int(c) for c in FLAGS.contexts],
        report=lambda e: print(f"  compiled {e.candidate}", flush=True),
    )
    best = outcome.best
    for line in (outcome.attention, outcome.experts, outcome.precision, *outcome.schedule):
        if line:
            print(line)
    for mesh, floor in outcome.too_small.items():
        print(
            f"not compiled: mesh {mesh}, weights and optimizer state alone "
            f"{plan_search.size(floor)} per device"
        )
    print(table(outcome.estimates))
    print(LEGEND)
    if best.depths is not None:
        print(
            f"extrapolated: every figure from compiles with {best.depths[0]} and "
            f"{best.depths[1]} layers to the model's {best.layers}"
        )
    print(
        f"recommended: mesh {best.candidate.mesh}, {best.candidate.accumulation} "
        f"micro-batches, remat {best.candidate.remat}: {plan_search.size(best.memory_bytes)} per "
        f"device, {1e3 * best.step_seconds:.3g} ms per step (roofline)"
    )
    print(f"flags: {best.candidate.flags()}")
    shape = plan_estimate.model_config(config, FLAGS.model_config)
    print(*_vision_lines(config, shape, best, devices), sep="", end="")
    if registry.kind_of(config).reads == "prompts":  # online RL: the sampler runs there too
        for line in plan_rollout.report(config, shape, best, devices, hardware.memory_bytes):
            print(line)


if __name__ == "__main__":
    app.run(main, flags_parser=lambda argv: cli.parse_flags(argv, unknown_override))
