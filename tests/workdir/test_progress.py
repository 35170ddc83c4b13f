"""Plain (non-terminal) progress lines carry the total and the time left."""

from __future__ import annotations

import logging

from sft_jax.workdir.metrics import Progress, duration


def test_plain_lines_say_the_step_of_the_total_and_the_time_left(caplog):
    clock = iter(0.5 * step for step in range(1, 100))
    progress = Progress(total=800, initial=0, every=10, clock=lambda: next(clock))
    assert progress.bar is None  # not a terminal under pytest: plain lines
    with caplog.at_level(logging.INFO, logger="sft_jax.workdir.metrics"):
        for step in range(1, 21):
            progress.update(step, {"train/loss": 5.27871, "train/tokens_per_sec": 9139.4})
    lines = [r.getMessage() for r in caplog.records]
    # 0.5 s a step since the first update: (800 - 10) x 0.5 s = 6m35s left at step 10.
    assert lines == [
        "step 10/800 (1%) loss 5.2787, 9,139 tokens/s, eta 6m35s",
        "step 20/800 (2%) loss 5.2787, 9,139 tokens/s, eta 6m30s",
    ]


def test_durations_read_as_people_write_them():
    assert [duration(s) for s in (0, 12.4, 460, 3600 * 2 + 300)] == ["0s", "12s", "7m40s", "2h05m"]
    progress = Progress(total=10, initial=0, every=1, clock=lambda: 1.0)
    progress.first = (5, 1.0)
    assert progress.eta(5, 1.0) == "?"  # no pace yet
