"""Metrics out: WORKDIR/metrics.jsonl, the experiment trackers, curves.png, the console (MFU's
FLOPs: train/flops.py)."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

from sft_jax.core.spec import RunSpec
from sft_jax.workdir.curves import CURVES_FILE, draw_run
from sft_jax.workdir.metric_names import documented
from sft_jax.workdir.trackers import RunTrackers

log = logging.getLogger(__name__)


class MetricsWriter:
    """Appends metric events to metrics.jsonl and hands them to the run's experiment trackers
    (workdir/trackers.py; TensorBoard by default); draws WORKDIR/curves.png at each eval and at
    the end (workdir/curves.py). Only process 0 writes."""

    def __init__(
        self,
        workdir: Path,
        enabled: bool = True,
        trackers: Callable[[], RunTrackers] | None = None,
        curves: bool = False,
    ):
        """trackers: starts the run's trackers (called on process 0 only); curves: draw them."""
        self.enabled = enabled and jax.process_index() == 0
        # The tests set it: a key missing from workdir/metric_names.py is an error, so no metric
        # ships undocumented.
        self.strict = bool(os.environ.get("SFT_JAX_STRICT_METRICS"))
        self.workdir, self.curves = workdir, curves and self.enabled
        self.curves_path: Path | None = None
        self._file = None
        self.trackers: RunTrackers | None = None
        if self.enabled:
            workdir.mkdir(parents=True, exist_ok=True)
            self._file = open(workdir / "metrics.jsonl", "a")  # noqa: SIM115 (kept open for the run)
            if trackers is not None:
                self.trackers = trackers()

    @classmethod
    def for_run(
        cls, config: RunSpec, workdir: Path, setup: Callable[[], dict[str, Any]]
    ) -> MetricsWriter:
        """The writer of a run: config.log's trackers (setup() gives the planner, memory and
        FLOPs figures they log with the config) and curves."""
        return cls(
            workdir,
            trackers=lambda: RunTrackers.start(config, workdir, setup()),
            curves=config.log.curves,
        )

    def write(self, step: int, values: dict[str, Any]) -> None:
        if self.strict:
            undocumented = sorted(key for key in values if not documented(key))
            if undocumented:
                raise AssertionError(
                    f"metrics {undocumented} are not in sft_jax/workdir/metric_names.py"
                )
        if not self.enabled:
            return
        record = {"step": step, **{k: _plain(v) for k, v in values.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self.trackers is not None:
            self.trackers.log(record)
        if any(key.startswith("eval/") for key in record):
            self.draw_curves()

    def draw_curves(self) -> None:
        """WORKDIR/curves.png from metrics.jsonl; a failure (no matplotlib) is one warning and
        no more pictures this run."""
        if not self.curves:
            return
        try:
            self.curves_path = draw_run(self.workdir)
        except Exception as e:
            log.warning("%s not drawn (%s: %s)", CURVES_FILE, type(e).__name__, e)
            self.curves = False

    def drop_after(self, step: int) -> None:
        """Removes metrics.jsonl records past `step` (a resumed run logs those steps again;
        the trackers, which hold them already, are not given them twice)."""
        if not self.enabled:
            return
        path = Path(self._file.name)
        self._file.close()
        lines = path.read_text().splitlines()
        kept = [line for line in lines if _step_of(line) <= step]
        partial = path.with_suffix(".jsonl.tmp")
        partial.write_text("".join(line + "\n" for line in kept))
        partial.replace(path)
        self._file = open(path, "a")  # noqa: SIM115 (kept open for the run)
        if self.trackers is not None:
            dropped = [json.loads(line) for line in lines if step < _step_of(line) < math.inf]
            self.trackers.skip((r["step"], key) for r in dropped for key in r if key != "step")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            self.draw_curves()
        if self.trackers is not None:
            self.trackers.finish()


def _step_of(line: str) -> float:
    """A record's step; a line torn by a kill mid-write counts as past every step."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return value


class Progress:
    """A progress bar on a terminal; otherwise, every `every` steps, a plain line with the
    total and the time left: `step 10/800 (1%) loss 5.2787, 9,139 tokens/s, eta 7m40s`."""

    def __init__(self, total: int, initial: int, every: int, clock: Any = time.monotonic):
        self.total, self.every, self.clock = total, every, clock
        self.bar = None
        self.first: tuple[int, float] | None = None  # (step, time) of the first update
        if sys.stderr.isatty() and jax.process_index() == 0:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

    def update(self, step: int, values: dict[str, Any]) -> None:
        loss, tokens_per_sec = values.get("train/loss"), values.get("train/tokens_per_sec", 0.0)
        now = self.clock()
        if self.first is None:
            self.first = (step, now)
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_sec:,.0f}")
        elif step % self.every == 0 and jax.process_index() == 0:
            percent = 100 * step // max(self.total, 1)
            log.info(
                "step %d/%d (%d%%) loss %.4f, %s tokens/s, eta %s",
                step,
                self.total,
                percent,
                loss,
                f"{tokens_per_sec:,.0f}",
                self.eta(step, now),
            )

    def eta(self, step: int, now: float) -> str:
        """The time left at the pace since the first update (its step's compile excluded);
        '?' before there is a pace."""
        first_step, first_time = self.first or (step, now)
        if step <= first_step or now <= first_time:
            return "?"
        seconds = (self.total - step) * (now - first_time) / (step - first_step)
        return duration(seconds)

    def message(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        elif jax.process_index() == 0:
            log.info("%s", text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def duration(seconds: float) -> str:
    """'7m40s', '2h05m', '12s'."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"
