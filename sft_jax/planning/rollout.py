"""Online RL in the plan: the sampler's memory beside the update's, on the recommended mesh.

The sampler (generation/sampler.rollout) runs between updates while the train state stays on
the device, so a rollout fits where the update step's arguments (params, optimizer state,
frozen weights, a batch) plus the sampler's temporaries (the KV cache of rows x (prompt +
completion) tokens, logits) fit: train/memory.check_rollout, which the run applies before it
samples, with the numbers this prints.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
from flax import nnx

from sft_jax.core.spec import RunSpec
from sft_jax.generation.sampler import lower_rollout
from sft_jax.planning import estimate as plan_estimate
from sft_jax.planning.search import size
from sft_jax.train import memory as memory_plan
from sft_jax.train import sharding
from sft_jax.train.memory import StepMemory

# The longest completion that fits: the configured one doubled up to this many times.
MAX_DOUBLINGS = 3


def sampler_memory(
    config: RunSpec, model: Any, mesh: Any, rows: int, completion: int
) -> StepMemory | None:
    """XLA's plan of one device's memory while sampling `rows` completions of `completion`
    tokens on `mesh`, from an abstract model (nothing allocated)."""
    state = nnx.state(model)
    nnx.replace_by_pure_dict(state, sharding.abstract_params(model, mesh, ...))
    with jax.set_mesh(mesh):
        lowered = lower_rollout(model, rows, config.grpo.max_prompt_length, completion, state)
        return StepMemory.of(memory_plan.compile_as_planned(lowered))


def _needed(sampler: StepMemory, train: StepMemory | None) -> int:
    resident = train.arguments if train is not None else sampler.arguments
    return resident + sampler.temporaries + sampler.outputs


def report(
    config: RunSpec,
    shape: Any,
    best: plan_estimate.Estimate,
    devices: Sequence[jax.Device],
    limit: int | None,
) -> list[str]:
    """Lines for the plan: the sampler's memory on `best`'s mesh beside its update step, and
    with a device limit, the longest completion (doubling the configured one) that fits."""
    model, _ = plan_estimate.abstract_run_model(config, shape)
    mesh = plan_estimate.candidate_mesh(best.candidate, devices)
    grpo, rows = config.grpo, config.train.global_batch_size
    sampler = sampler_memory(config, model, mesh, rows, grpo.max_completion_length)
    if sampler is None:
        return ["sampler: XLA gives no memory plan on this backend"]
    lines = [
        f"sampler: {rows} rows ({rows // grpo.num_generations} prompts x "
        f"{grpo.num_generations} completions) x ({grpo.max_prompt_length} prompt + "
        f"{grpo.max_completion_length} completion) tokens: {size(sampler.total)} per device "
        f"(KV cache, logits), {size(_needed(sampler, best.memory))} with the train state"
    ]
    if limit is None:
        return lines
    longest = 0
    for completion in (grpo.max_completion_length * 2**k for k in range(MAX_DOUBLINGS + 1)):
        plan = sampler_memory(config, model, mesh, rows, completion)
        if plan is None or _needed(plan, best.memory) > memory_plan.FIT_FRACTION * limit:
            break
        longest = completion
    if not longest:
        return [
            *lines,
            f"the rollout does not fit {size(limit)} devices beside the train state: the run "
            "will refuse it; lower grpo.num_generations, grpo.max_completion_length or "
            "train.global_batch_size",
        ]
    more = "" if longest < grpo.max_completion_length * 2**MAX_DOUBLINGS else " or more"
    return [*lines, f"longest completion that fits with these rows: {longest} tokens{more}"]
