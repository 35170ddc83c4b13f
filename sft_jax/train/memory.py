"""XLA's plan of a compiled step's device memory, the device's limit, and what to say when a
step will not fit."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from sft_jax.core.errors import ConfigError

log = logging.getLogger(__name__)

# XLA:CPU's default scheduler orders a program for concurrency: it starts every collective as
# soon as its operands exist, so an FSDP step's all-gathers of every layer's weights (the
# forward's and the backward's recomputation's) all run first and their results stay alive
# together: a Llama LoRA step on 8 devices planned 2.4x the temporaries of one layer at a time
# (tests/planning/test_plan.py). Accelerators' schedulers weigh memory; compiles that stand for
# them on CPU (the planner's) use XLA:CPU's memory-optimized scheduler instead.
PLAN_COMPILER_OPTIONS = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}

# The share of a device's memory a train step's plan may fill: the rest absorbs the
# allocator's fragmentation and the buffers outside the step (prefetched batches, eval).
FIT_FRACTION = 0.95


@dataclasses.dataclass(frozen=True)
class StepMemory:
    """XLA's plan for one device's memory in a compiled step, in bytes (known before it runs)."""

    arguments: int  # state, frozen variables and batch (this device's shards)
    outputs: int
    aliased: int  # outputs written into donated arguments (counted once, in `arguments`)
    temporaries: int  # activations, gradients, logits chunks, ...
    code: int
    # Activations offloaded to pinned host memory (remat "offload"): host RAM, not in `total`.
    host_temporaries: int = 0

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
                host_temporaries=int(getattr(stats, "host_temp_size_in_bytes", 0) or 0),
            )
        except (AttributeError, TypeError):
            return None

    def describe(self) -> str:
        gib = 2.0**30
        return (
            f"{self.total / gib:.2f} GiB per device: arguments {self.arguments / gib:.2f}, "
            f"temporaries {self.temporaries / gib:.2f}, new outputs "
            f"{(self.outputs - self.aliased) / gib:.2f} (XLA's estimate)"
            + (
                f"; {self.host_temporaries / gib:.2f} GiB offloaded to host memory"
                if self.host_temporaries
                else ""
            )
        )


def compile_as_planned(lowered: Any) -> Any:
    """`lowered` compiled as the planner compiles it: on CPU with PLAN_COMPILER_OPTIONS (the
    memory a scheduler that weighs memory plans), elsewhere as it is."""
    if jax.devices()[0].platform != "cpu":
        return lowered.compile()
    return lowered.compile(compiler_options=PLAN_COMPILER_OPTIONS)


def host_offload_supported() -> bool:
    """Whether this backend keeps pinned host memory apart from the device's, so that remat
    "offload" moves activations off the device (GPUs, TPUs; not the CPU backend, where the
    policy compiles but moves nothing)."""
    device = jax.local_devices()[0]
    kinds = {memory.kind for memory in device.addressable_memories()}
    return device.platform != "cpu" and "pinned_host" in kinds


def device_bytes_limit() -> int | None:
    """What one device can hold (its allocator's limit), the least over all processes so that
    every process compiles the same program; None where jax does not say (CPU)."""
    stats = jax.local_devices()[0].memory_stats() or {}
    limit = int(stats.get("bytes_limit") or 0)
    if jax.process_count() > 1:  # collective: every process calls this once, at the start
        limit = int(np.min(multihost_utils.process_allgather(np.int64(limit))))
    return limit or None


def out_of_memory(error: Exception) -> bool:
    """Whether a compile failed for want of device memory (XLA:TPU refuses such a program at
    compile time: "RESOURCE_EXHAUSTED: ... Ran out of memory in memory space hbm")."""
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "Ran out of memory" in text


def fits(plan: StepMemory | None, limit: int | None) -> bool:
    """Whether a plan fits FIT_FRACTION of the limit; True where either is unknown."""
    return limit is None or plan is None or plan.total <= FIT_FRACTION * limit


def lower_it(remat: str) -> str:
    """What lowers a train step's memory, in config fields."""
    remat_advice = (
        "config.model.remat='auto' (or 'full'), " if remat not in ("full", "auto") else ""
    )
    return (
        f"Lower it with {remat_advice}a higher config.train.gradient_accumulation_steps (the "
        "same global batch, fewer rows at once), a smaller config.train.loss_chunk_size, more "
        "devices, or LoRA."
    )


def warn_if_over_memory(plan: StepMemory | None, limit: int | None, remat: str) -> None:
    """Logs the train step's planned memory, and warns before the first step where it exceeds
    what the device can hold (the step would fail with RESOURCE_EXHAUSTED)."""
    if plan is None:
        return
    log.info("train step memory: %s", plan.describe())
    if limit and plan.total > limit:
        log.warning(
            "the train step plans %.2f GiB per device but the device holds %.2f GiB: it will "
            "likely run out of memory. %s",
            plan.total / 2**30,
            limit / 2**30,
            lower_it(remat),
        )


def check_rollout(
    sampler: StepMemory | None, train: StepMemory | None, limit: int | None, shape: str
) -> None:
    """Logs the sampler's planned memory and refuses, before any sampling, a rollout that does
    not fit beside the train state: the train step's arguments (params, optimizer state, frozen
    variables, a batch) stay on the device while the sampler's temporaries (KV cache, logits)
    and outputs are added. shape says what is sampled (for the messages)."""
    if sampler is None:
        return
    log.info("sampler memory (%s): %s", shape, sampler.describe())
    resident = train.arguments if train is not None else sampler.arguments
    needed = resident + sampler.temporaries + sampler.outputs
    if limit and needed > FIT_FRACTION * limit:
        gib = 2.0**30
        raise ConfigError(
            f"sampling {shape} plans {(needed - resident) / gib:.2f} GiB per device (KV cache and "
            f"logits) beside the train state's {resident / gib:.2f} GiB: {needed / gib:.2f} GiB, "
            f"over {100 * FIT_FRACTION:.0f}% of the device's {limit / gib:.2f} GiB. Lower "
            "config.grpo.num_generations, config.grpo.max_completion_length, "
            "config.grpo.max_prompt_length or config.train.global_batch_size (prompts per "
            "update), or use more devices."
        )
