"""The run's experiment trackers (config.log.trackers) as one: started once, handed every
metrics.jsonl record, finished at the end; a tracker that fails is one warning line and is
dropped, and training goes on (metrics.jsonl has everything).

Each tracker's run id is kept in WORKDIR/trackers.json, so a resumed run logs to the same
tracker run (W&B id with resume="allow", the MLflow run id, the trackio run name).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jax

from sft_jax.core.spec import RunSpec
from sft_jax.generation.samples import SAMPLE_COLUMNS, sample_rows
from sft_jax.workdir.tracker_backends import BACKENDS, TrackedRun, Tracker

log = logging.getLogger(__name__)

IDS_FILE = "trackers.json"
COMPLETIONS_FILE = "completions.jsonl"  # online RL's rollouts (loop/rollouts.py)
COMPLETION_COLUMNS = ("step", "prompt_index", "prompt", "completion", "rewards", "advantage")
COMPLETION_ROWS = 64  # of the newest rollout, per eval


class RunTrackers:
    """The trackers that started; each call goes to all of them."""

    def __init__(self, workdir: Path, trackers: dict[str, Tracker]):
        self.workdir, self.trackers = workdir, trackers
        self.already_logged: set[tuple[int, str]] = set()  # (step, key) a resume repeats
        self.completions_offset = 0

    @classmethod
    def start(cls, config: RunSpec, workdir: Path, setup: dict[str, Any]) -> RunTrackers:
        """Starts config.log.trackers; `setup` (planner, memory, FLOPs figures) is logged with
        the config."""
        ids = _read_ids(workdir)
        started: dict[str, Tracker] = {}
        for name in config.log.tracker_names():
            run = TrackedRun(
                workdir=workdir,
                name=config.log.run_name or workdir.resolve().name,
                config=config.to_dict() | {"setup": setup},
                project=config.log.project,
                wandb_entity=config.log.wandb_entity,
                mlflow_tracking_uri=config.log.mlflow_tracking_uri,
                saved_id=ids.get(name),
            )
            tracker = BACKENDS[name]()
            try:
                ids[name] = tracker.start(run)
            except Exception as e:  # not installed, no credentials, offline, ...
                _warn(name, "could not start", e)
                continue
            started[name] = tracker
        if started:
            _write_ids(workdir, ids)
        trackers = cls(workdir, started)
        trackers.completions_offset = _size(workdir / COMPLETIONS_FILE)
        return trackers

    def log(self, record: dict[str, Any]) -> None:
        """One metrics.jsonl record ({"step": s, key: value, ...}), less what the trackers
        logged before a resume (the same steps run again, with the same values)."""
        step = record["step"]
        values = {k: v for k, v in record.items() if (step, k) not in self.already_logged}
        scalars = {
            k: float(v)
            for k, v in values.items()
            if k != "step" and isinstance(v, int | float) and math.isfinite(v)
        }
        texts = {k: v for k, v in values.items() if isinstance(v, str)}
        self._each("log", step, scalars, texts)
        for key, text in texts.items():
            rows = sample_rows(text)
            if rows:
                self._each("table", step, key, SAMPLE_COLUMNS, rows)
            else:
                self._each("table", step, key, ("text",), [[text]])
        if any(k.startswith("eval/") for k in values):
            self._log_completions(step)

    def _log_completions(self, step: int) -> None:
        """The newest rollout's completions (online RL) as a table, at each eval."""
        path = self.workdir / COMPLETIONS_FILE
        size = _size(path)
        if size < self.completions_offset:  # a resume cut the updates it runs again
            self.completions_offset = size
        if not self.trackers or size <= self.completions_offset:
            return
        with open(path, encoding="utf-8") as f:
            f.seek(self.completions_offset)
            records = [json.loads(line) for line in f if line.endswith("\n")]
            self.completions_offset = f.tell()
        newest = [r for r in records if r["step"] == records[-1]["step"]][:COMPLETION_ROWS]
        rows = [[_cell(r.get(column)) for column in COMPLETION_COLUMNS] for r in newest]
        self._each("table", step, "train/completions", COMPLETION_COLUMNS, rows)

    def skip(self, logged: Iterable[tuple[int, str]]) -> None:
        """(step, key) pairs the trackers hold from before a resume: not logged again."""
        self.already_logged |= set(logged)

    def finish(self) -> None:
        self._each("finish")
        self.trackers = {}

    def _each(self, method: str, *args: Any) -> None:
        for name, tracker in list(self.trackers.items()):
            try:
                getattr(tracker, method)(*args)
            except Exception as e:
                _warn(name, f"failed in {method}", e)
                del self.trackers[name]


def setup_figures(trainer: Any) -> dict[str, Any]:
    """What the run's setup measured (a loop.trainer.Trainer's): the compile time, XLA's plan
    of the train step's memory, FLOPs per token and the peak that MFU divides by, the devices.
    The mesh, remat and micro-batches the planner chose are in the config itself."""
    memory = trainer.steps.train_memory
    return {
        "compile_seconds": trainer.steps.compile_seconds,
        "train_step_memory_gib": memory.total / 2**30 if memory is not None else None,
        "train_step_memory": memory.describe() if memory is not None else "unknown",
        "flops_per_token": trainer.flops_per_token,
        "peak_tflops_per_device": (trainer.peak_flops or 0) / 1e12,
        "devices": jax.device_count(),
        "device_kind": jax.devices()[0].device_kind,
    }


def _warn(name: str, what: str, error: Exception) -> None:
    first_line = (str(error).strip().splitlines() or [""])[0][:300]
    log.warning(
        "tracker %s %s (%s: %s); training goes on without it (metrics.jsonl has every metric)",
        name,
        what,
        type(error).__name__,
        first_line,
    )


def _cell(value: Any) -> Any:
    """A table cell: a dict (the rewards by function) as its JSON text."""
    return json.dumps(value) if isinstance(value, dict) else value


def _read_ids(workdir: Path) -> dict[str, str]:
    path = workdir / IDS_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def _write_ids(workdir: Path, ids: dict[str, str]) -> None:
    partial = workdir / (IDS_FILE + ".tmp")
    partial.write_text(json.dumps(ids, indent=2) + "\n")
    partial.replace(workdir / IDS_FILE)


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0
