"""The prefetch thread: same batches and states as reading directly, errors where consumed."""

from __future__ import annotations

import threading

import pytest

from sft_jax.train.prefetch import Prefetch


class Counting:
    """Batches 0, 1, 2, ... with state = the next batch; raises at `fail_at` or stops at `end`."""

    def __init__(self, end: int | None = None, fail_at: int | None = None):
        self.position, self.end, self.fail_at = 0, end, fail_at

    def __next__(self) -> int:
        if self.position == self.fail_at:
            raise ValueError(f"bad row in batch {self.position}")
        if self.position == self.end:
            raise StopIteration
        self.position += 1
        return self.position - 1

    def get_state(self) -> dict:
        return {"position": self.position}


def test_batches_come_in_order_with_the_state_after_each():
    feed = Prefetch(Counting(), put=lambda b: b * 10, depth=3)
    got = [next(feed) for _ in range(5)]
    feed.close()
    assert got == [(b * 10, {"position": b + 1}) for b in range(5)]
    assert not any(t.name == "sft_jax-prefetch" for t in threading.enumerate())


def test_the_end_and_errors_reach_the_consumer_in_order():
    assert list(Prefetch(Counting(end=3), put=lambda b: b)) == [
        (0, {"position": 1}), (1, {"position": 2}), (2, {"position": 3}),
    ]  # fmt: skip
    feed = Prefetch(Counting(fail_at=2), put=lambda b: b)
    assert [next(feed)[0] for _ in range(2)] == [0, 1]
    with pytest.raises(ValueError, match="bad row in batch 2"):
        next(feed)
    feed.close()
