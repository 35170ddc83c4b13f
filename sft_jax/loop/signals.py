"""Signals: SIGTERM / SIGINT as a request to save and stop, agreed by every process."""

from __future__ import annotations

import contextlib
import functools
import logging
import signal
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sft_jax.core.errors import UserError

log = logging.getLogger(__name__)


class SignalStopError(UserError):
    """A signal stopped work that cannot stop half way and resume (an export)."""


@contextlib.contextmanager
def signals_raise(message: str) -> Iterator[None]:
    """SIGTERM / SIGINT inside the block raise SignalStopError(message) instead of killing the
    process mid-write, so the error boundary can say what is complete."""

    def handle(signum: int, frame: object) -> None:
        raise SignalStopError(f"{signal.Signals(signum).name}: {message}")

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class StopSignal:
    """Turns SIGTERM / SIGINT into a request to save and stop after the current step."""

    def __init__(self):
        self.requested = False
        self._previous = {}
        self._vote = None  # with several processes: the last vote, still on the devices

    def __enter__(self) -> StopSignal:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: object) -> None:
        log.warning(
            "received %s: saving after this step (with several processes, the next), then "
            "stopping.",
            signal.Signals(signum).name,
        )
        self.requested = True

    def agreed(self) -> bool:
        """True when any process was signalled; every process answers alike at the same call.

        With several processes the flags are combined on the devices and each call answers the
        previous call's vote, which has finished by then (it ran before the last step), so the
        host never waits for the step it just dispatched: a signal stops one step later.
        """
        if jax.process_count() == 1:
            return self.requested
        previous, self._vote = self._vote, _any_process(self.requested)
        return previous is not None and bool(np.asarray(previous.addressable_data(0)))


@functools.cache
def _vote_program() -> tuple[jax.sharding.NamedSharding, Any]:
    """(sharding of one flag per device, jitted 'any' replicated on every device)."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("devices",))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    per_device = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("devices"))
    return per_device, jax.jit(jnp.any, out_shardings=replicated)


def _any_process(flag: bool) -> jax.Array:
    """Whether any process's flag is set, as a device array every process can read (async)."""
    per_device, any_of = _vote_program()
    flags = np.full((jax.local_device_count(),), flag)
    return any_of(jax.make_array_from_process_local_data(per_device, flags, (jax.device_count(),)))
