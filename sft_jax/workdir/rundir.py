"""The layout of a run's WORKDIR, and another run's checkpoints opened by step.

WORKDIR/checkpoints/<step>/      Orbax checkpoints (sft_jax.workdir.checkpointing)
WORKDIR/checkpoints_damaged/     steps that could not be restored, kept for a look
WORKDIR/export/                  the Hugging Face export (default of config.export.dir)
WORKDIR/metrics.jsonl, events.*  metrics (sft_jax.workdir.metrics)
WORKDIR/curves.png               losses, learning rate, scores by step (sft_jax.workdir.curves)
WORKDIR/trackers.json            each experiment tracker's run id (sft_jax.workdir.trackers)

A bucket WORKDIR (s3://, gs://) has the same layout, in the bucket and in its local staging copy
(sft_jax.workdir.bucket_mirror).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax

from sft_jax.core.errors import ConfigError
from sft_jax.workdir.checkpointing import Checkpoints, committed_steps

LOCK_FILE = ".sft_jax.lock"
LOG_FILE = "log.txt"  # everything logged, the libraries' INFO included (run_log)


def checkpoints_path(workdir: str | Path) -> Path:
    """Where a run in WORKDIR keeps its checkpoints."""
    return Path(workdir) / "checkpoints"


def checkpoint_dir(path: str | Path) -> Path:
    """A run's WORKDIR or its checkpoints/ folder -> the checkpoints folder."""
    return checkpoints_path(path) if checkpoints_path(path).is_dir() else Path(path)


def saved_steps(workdir: str | Path) -> list[int]:
    """Steps whose checkpoint is committed, read from the directory alone: safe to call after
    any failure."""
    return committed_steps(checkpoints_path(workdir))


def saved_config(workdir: str | Path) -> dict[str, Any] | None:
    """The config the newest committed checkpoint in WORKDIR was trained with (a resume's);
    None where there is none or it cannot be read (then the restore itself tells)."""
    steps = saved_steps(workdir)
    if not steps:
        return None
    meta = checkpoints_path(workdir) / str(steps[-1]) / "meta" / "metadata"  # Orbax's JSON item
    try:
        return json.loads(json.loads(meta.read_text())["config"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def saved_note(workdir: str | Path) -> str:
    """What a failed run leaves, for its error message."""
    steps = saved_steps(workdir)
    if not steps:
        return ""
    return (
        f"The last complete checkpoint (step {steps[-1]}) is intact in "
        f"{checkpoints_path(workdir)}: run the same command again to resume from it."
    )


def export_dir(workdir: str | Path, out: str | Path | None = None) -> Path:
    """Where an export of the run goes: `out` where given, else WORKDIR/export."""
    return Path(out) if out else Path(workdir) / "export"


def open_run(workdir: str | Path, field: str = "--workdir") -> Checkpoints:
    """Another (finished or stopped) run's checkpoints, read only; a clear error when none.
    (A run in a bucket is read from its staging copy: bucket_mirror.readable_run.)"""
    directory = checkpoint_dir(workdir)
    if not directory.is_dir():
        raise ConfigError(
            f"{field}={workdir}: {directory} does not exist; give the WORKDIR of a run that saved "
            "checkpoints."
        )
    checkpoints = Checkpoints(directory, read_only=True)
    if not checkpoints.steps():
        raise ConfigError(f"{field}={workdir}: {directory} holds no complete checkpoint.")
    return checkpoints


def pick_step(checkpoints: Checkpoints, which: str | int) -> int:
    """The step `which` names among a run's checkpoints (opened by open_run: there is one)."""
    steps = checkpoints.steps()
    if isinstance(which, int) or str(which).isdigit():
        if int(which) not in steps:
            raise ConfigError(
                f"{checkpoints.directory}: no checkpoint at step {which}; have {steps}."
            )
        return int(which)
    if which == "best":
        best = checkpoints.best_step()
        return steps[-1] if best is None else best
    if which == "last":
        return steps[-1]
    raise ConfigError(f"which={which!r}: expected 'best', 'last' or a step number.")


@contextlib.contextmanager
def run_log(workdir: Path) -> Iterator[None]:
    """Every log record of the run at INFO and above, the libraries' included (the terminal
    shows sft_jax's and the libraries' warnings: cli.quiet_logs), appended to WORKDIR/log.txt
    by process 0."""
    if jax.process_index() != 0:
        yield
        return
    handler = logging.FileHandler(workdir / LOG_FILE, delay=True)
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()


@contextlib.contextmanager
def lock(workdir: Path) -> Iterator[None]:
    """Holds WORKDIR for one run: a second run on it stops with a clear message. The lock is
    the kernel's (flock), so it goes away with its process, even after kill -9. Process 0
    holds it for every process of a job."""
    if jax.process_index() != 0:
        yield
        return
    workdir.mkdir(parents=True, exist_ok=True)
    before = {p.name for p in workdir.iterdir()}
    with open(workdir / LOCK_FILE, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise ConfigError(
                f"--workdir={workdir}: another run is using it ({holder}). Wait for it to end "
                "or stop it, or choose another --workdir."
            ) from None
        handle.seek(0)
        handle.truncate()
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}, since {started}\n")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
            ours = {LOCK_FILE, LOG_FILE} - before  # what this run made besides its output
            wrote_nothing = {p.name for p in workdir.iterdir()} <= before | ours
            if LOCK_FILE in ours and wrote_nothing:  # a run that never started leaves nothing
                for name in ours:
                    (workdir / name).unlink(missing_ok=True)


def remove_if_empty(workdir: str | Path) -> None:
    """Removes WORKDIR where a run that created it stopped before writing anything into it
    (a config or data error): nothing is left behind to mistake for a run."""
    path = Path(workdir)
    if path.is_dir() and not any(path.iterdir()):
        path.rmdir()
