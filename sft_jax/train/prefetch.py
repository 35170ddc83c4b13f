"""Batches made and put on the devices ahead of the train step, in a background thread.

The step is dispatched asynchronously, so while the devices compute step s the thread builds
and transfers the rows of steps s+1 .. s+depth. Each batch comes with the data iterator's state
after it: a checkpoint records what training consumed, not how far the thread has read.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

_DONE = object()


class Prefetch:
    """Iterator of (device batch, iterator state after it); errors surface in the consumer."""

    def __init__(self, batches: Any, put: Callable[[Any], Any], depth: int = 2):
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._fill, args=(batches, put), name="sft_jax-prefetch", daemon=True
        )
        self._thread.start()

    def _offer(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _fill(self, batches: Any, put: Callable[[Any], Any]) -> None:
        try:
            while not self._stop.is_set():
                batch = next(batches)
                if not self._offer((put(batch), batches.get_state())):
                    return
        except StopIteration:
            self._offer(_DONE)
        except BaseException as error:  # a data error: raise it where the batch was wanted
            self._offer(error)

    def __iter__(self) -> Prefetch:
        return self

    def __next__(self) -> tuple[Any, Any]:
        item = self._queue.get()
        if item is _DONE:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        """Stops the thread (what it read ahead is dropped; the states say what was used)."""
        self._stop.set()
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout=30)
