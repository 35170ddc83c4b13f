"""Where the loop's train batches come from: files (FileBatches, today's data sources), or a
producer that runs on the current params (online RL: rollouts from the policy as it is now).

The loop opens a source with a function that returns the live train params and draws
(device batch, source state after it) pairs from it, one per step; the state goes into each
checkpoint, so a resumed run continues from the batch after the last one trained on.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from sft_jax.data import DataSource
from sft_jax.train.prefetch import Prefetch
from sft_jax.train.sharding import device_batch

# The live params of the train state (the trainable part; the frozen part is the steps').
Params = Callable[[], Any]


class BatchSource(Protocol):
    """What the loop needs from a source of train batches."""

    def get_state(self) -> Any:
        """JSON-able state before the first batch the next `open` gives (for checkpoints)."""

    def set_state(self, state: Any) -> None:
        """Continue after the batch whose state this is (a resume)."""

    def open(self, params: Params) -> contextlib.AbstractContextManager[Iterator[tuple[Any, Any]]]:
        """(device batch, state after it), one per step, for as long as the loop draws."""

    def metrics(self) -> dict[str, float]:
        """Host metrics of the batch drawn last, logged with its step's (may be empty)."""


class FileBatches:
    """A DataSource's train rows, built and put on the mesh ahead of the step by a prefetch
    thread (train/prefetch.py). They do not depend on the params: `params` is not called."""

    def __init__(self, data: DataSource, shardings: Any, global_rows: int, depth: int):
        self.data, self.shardings, self.global_rows, self.depth = (
            data,
            shardings,
            global_rows,
            depth,
        )

    def get_state(self) -> Any:
        return self.data.train_batches.get_state()

    def set_state(self, state: Any) -> None:
        self.data.train_batches.set_state(state)

    def metrics(self) -> dict[str, float]:
        return {}

    @contextlib.contextmanager
    def open(self, params: Params) -> Iterator[Prefetch]:
        del params  # rows from files do not depend on the params
        shardings, rows = self.shardings, self.global_rows
        feed = Prefetch(
            self.data.train_batches,
            lambda local: device_batch(local, shardings, rows),
            depth=self.depth,
        )
        with contextlib.closing(feed):
            yield feed


class OnPolicyBatches:
    """Batches made on demand from the live params, one per step, never ahead of the step (an
    on-policy producer must see the params the previous step wrote): produce(params, index)
    returns this process's rows of global batch `index` as host arrays; the state is the
    index of the next batch."""

    def __init__(self, produce: Callable[[Any, int], dict], shardings: Any, global_rows: int):
        self.produce, self.shardings, self.global_rows = produce, shardings, global_rows
        self.index = 0

    def get_state(self) -> Any:
        return {"batches": self.index}

    def set_state(self, state: Any) -> None:
        self.index = int(state["batches"])

    def metrics(self) -> dict[str, float]:
        return {}

    @contextlib.contextmanager
    def open(self, params: Params) -> Iterator[Iterator[tuple[Any, Any]]]:
        def batches() -> Iterator[tuple[Any, Any]]:
            while True:
                local = self.produce(params(), self.index)
                self.index += 1
                yield device_batch(local, self.shardings, self.global_rows), self.get_state()

        yield batches()
