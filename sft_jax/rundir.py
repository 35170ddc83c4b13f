"""The layout of a run's WORKDIR, and another run's checkpoints opened by step.

WORKDIR/checkpoints/<step>/      Orbax checkpoints (sft_jax.checkpointing)
WORKDIR/checkpoints_damaged/     steps that could not be restored, kept for a look
WORKDIR/export/                  the Hugging Face export (default of config.export.dir)
WORKDIR/metrics.jsonl, events.*  metrics (sft_jax.metrics)
"""

from __future__ import annotations

from pathlib import Path

from sft_jax.checkpointing import Checkpoints
from sft_jax.errors import ConfigError


def checkpoints_path(workdir: str | Path) -> Path:
    """Where a run in WORKDIR keeps its checkpoints."""
    return Path(workdir) / "checkpoints"


def checkpoint_dir(path: str | Path) -> Path:
    """A run's WORKDIR or its checkpoints/ folder -> the checkpoints folder."""
    return checkpoints_path(path) if checkpoints_path(path).is_dir() else Path(path)


def export_dir(workdir: str | Path, out: str | Path | None = None) -> Path:
    """Where an export of the run goes: `out` where given, else WORKDIR/export."""
    return Path(out) if out else Path(workdir) / "export"


def open_run(workdir: str | Path, field: str = "--workdir") -> Checkpoints:
    """Another (finished or stopped) run's checkpoints, read only; a clear error when none."""
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
