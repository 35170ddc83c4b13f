"""Draws runs' curves in one picture, from their metrics.jsonl files:

  python -m sft_jax.report RUN [RUN ...] [--out FILE]

Each RUN is a WORKDIR (or its metrics.jsonl); the panels are the losses, the learning rate and
the scores (exact match, rewards, lm-eval harness scores) by step, each run in its own colors.
--out defaults to curves.png in the current directory. Prints the picture's path.
"""

from __future__ import annotations

from pathlib import Path

from absl import app, flags

from sft_jax import cli
from sft_jax.core.errors import UsageError
from sft_jax.workdir.curves import draw, read_metrics


def metrics_file(run: str) -> Path:
    """A run's metrics.jsonl, from its WORKDIR or the file itself."""
    path = Path(run).expanduser()
    path = path / "metrics.jsonl" if path.is_dir() else path
    if not path.is_file():
        raise UsageError(f"{run}: no metrics.jsonl there; give a run's WORKDIR.")
    return path


def report(runs: list[str], out: Path) -> Path:
    """The picture of `runs` (WORKDIRs), each named by its folder (its path where two share
    one)."""
    if not runs:
        raise UsageError("give one or more runs: python -m sft_jax.report RUN [RUN ...]")
    files = [metrics_file(run) for run in runs]
    names = [file.parent.name for file in files]
    if len(set(names)) < len(names):
        names = [str(file.parent) for file in files]
    return draw([(name, read_metrics(f)) for name, f in zip(names, files, strict=True)], out)


def main(argv: list[str]) -> None:
    out = Path(flags.FLAGS.out)
    print(cli.run_command(lambda: report(argv[1:], out)))


if __name__ == "__main__":
    # Flags are defined only when run as a command: importing this module defines none.
    flags.DEFINE_string("out", "curves.png", "The picture to write (PNG).")
    cli.define_debug_flag()
    app.run(main, flags_parser=lambda argv: cli.parse_flags(argv, lambda argv: None))
