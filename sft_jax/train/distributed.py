"""Multi-host start-up: jax.distributed on Cloud TPU pods, SLURM, or an explicit coordinator."""

from __future__ import annotations

import logging
import os

import jax

from sft_jax.core.spec import DistributedSpec

log = logging.getLogger(__name__)


def _launched_on_several_hosts() -> bool:
    """True under SLURM with several tasks or on a multi-host Cloud TPU slice."""
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return True
    tpu_hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return len([h for h in tpu_hosts.split(",") if h]) > 1


def initialize(config: DistributedSpec) -> None:
    """Starts jax.distributed when the job spans processes; a single process does nothing.

    config.coordinator_address set: explicit (num_processes, process_id from the config).
    Otherwise SLURM and Cloud TPU are detected (or config.force is set) and jax reads their
    environment itself.
    """
    if config.coordinator_address:
        if config.cpu_collectives:
            jax.config.update("jax_cpu_collectives_implementation", config.cpu_collectives)
        jax.distributed.initialize(
            coordinator_address=config.coordinator_address,
            num_processes=config.num_processes,
            process_id=config.process_id,
        )
    elif config.force or _launched_on_several_hosts():
        jax.distributed.initialize()
    else:
        return
    log.info(
        "process %d of %d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
