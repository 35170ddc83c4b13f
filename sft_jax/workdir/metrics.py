"""Metrics out: WORKDIR/metrics.jsonl, TensorBoard events, console (MFU's FLOPs: train/flops.py)."""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

import jax

log = logging.getLogger(__name__)


class MetricsWriter:
    """Appends metric events to metrics.jsonl and TensorBoard; only process 0 writes."""

    def __init__(self, workdir: Path, enabled: bool = True):
        self.enabled = enabled and jax.process_index() == 0
        self._file = None
        self._tensorboard = None
        if self.enabled:
            workdir.mkdir(parents=True, exist_ok=True)
            self._file = open(workdir / "metrics.jsonl", "a")  # noqa: SIM115 (kept open for the run)
            from tensorboardX import SummaryWriter

            self._tensorboard = SummaryWriter(str(workdir / "tensorboard"))

    def write(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _plain(v) for k, v in values.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        for key, value in record.items():
            if key == "step":
                continue
            if isinstance(value, str):
                self._tensorboard.add_text(key, value, step)
            elif isinstance(value, (int, float)) and math.isfinite(value):
                self._tensorboard.add_scalar(key, value, step)
        self._tensorboard.flush()

    def drop_after(self, step: int) -> None:
        """Removes metrics.jsonl records past `step` (a resumed run logs those steps again)."""
        if not self.enabled:
            return
        path = Path(self._file.name)
        self._file.close()
        kept = [line for line in path.read_text().splitlines() if _step_of(line) <= step]
        partial = path.with_suffix(".jsonl.tmp")
        partial.write_text("".join(line + "\n" for line in kept))
        partial.replace(path)
        self._file = open(path, "a")  # noqa: SIM115 (kept open for the run)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._tensorboard.close()


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
    """A progress bar on a terminal, plain log lines every `every` steps otherwise."""

    def __init__(self, total: int, initial: int, every: int):
        self.every = every
        self.bar = None
        if sys.stderr.isatty() and jax.process_index() == 0:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

    def update(self, step: int, values: dict[str, Any]) -> None:
        loss, tokens_per_sec = values.get("train/loss"), values.get("train/tokens_per_sec", 0.0)
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_sec:,.0f}")
        elif step % self.every == 0 and jax.process_index() == 0:
            log.info("step %d: loss %.4f, %.0f tokens/s", step, loss, tokens_per_sec)

    def message(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        elif jax.process_index() == 0:
            log.info("%s", text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
