"""Run pictures: losses, learning rate and scores over steps, drawn from metrics.jsonl files
(WORKDIR/curves.png during a run; `python -m sft_jax.report` for several runs at once).
matplotlib is imported when a picture is drawn, with its file-only backend (Agg)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

CURVES_FILE = "curves.png"

# Scores: higher is better; those present are drawn in one panel (harness/<task>/<metric>:
# lm-eval scores where the run has them).
SCORES = (
    "eval/exact_match",
    "eval/accuracy",
    "eval/rewards/accuracies",
    "train/reward",
    "eval/reward",
    "eval/pass@1",
    "eval/pass@k",
)


def _is_score(key: str) -> bool:
    return key in SCORES or key.startswith("harness/")


# (panel title, which keys it draws)
PANELS: tuple[tuple[str, Callable[[str], bool]], ...] = (
    ("loss", lambda key: key in ("train/loss", "eval/loss")),
    ("learning rate", lambda key: key == "train/learning_rate"),
    ("scores", _is_score),
)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl (a line a kill cut short is left out)."""
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def series(records: list[dict[str, Any]]) -> dict[str, tuple[list[int], list[float]]]:
    """key -> (steps, values) of every finite number in the records, by step."""
    out: dict[str, tuple[list[int], list[float]]] = {}
    for record in sorted(records, key=lambda r: r["step"]):
        for key, value in record.items():
            finite = isinstance(value, int | float) and math.isfinite(value)
            if key != "step" and finite and not isinstance(value, bool):
                steps, values = out.setdefault(key, ([], []))
                steps.append(record["step"])
                values.append(float(value))
    return out


def draw(runs: Sequence[tuple[str, list[dict[str, Any]]]], out: Path) -> Path:
    """One picture of the runs (name, metrics records): a panel per PANELS entry that has
    data, each run's curves in its own color (train solid, eval dashed with markers)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    data = [(name, series(records)) for name, records in runs]
    every_key = sorted({key for _, curves in data for key in curves})
    panels = [(title, [key for key in every_key if wanted(key)]) for title, wanted in PANELS]
    panels = [panel for panel in panels if panel[1]] or [("no metrics yet", [])]
    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for axis, (title, keys) in zip(axes[0], panels, strict=True):
        _panel(axis, title, keys, data, colors)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return out


def _panel(axis: Any, title: str, keys: list[str], data: list, colors: list) -> None:
    """One panel: every key of every run that has it; a color per (run, key)."""
    shade = 0
    for run, curves in data:
        for key in keys:
            if key not in curves:
                continue
            steps, values = curves[key]
            label = key if len(data) == 1 else f"{run}: {key}"
            style = "-" if key.startswith("train/") else "--o"
            color = colors[shade % len(colors)]
            axis.plot(steps, values, style, label=label, color=color, markersize=3)
            shade += 1
    axis.set_title(title)
    axis.set_xlabel("step")
    axis.grid(alpha=0.3)
    if keys:
        axis.legend(fontsize=7)


def draw_run(workdir: Path) -> Path:
    """WORKDIR/curves.png from WORKDIR/metrics.jsonl."""
    return draw([(workdir.name, read_metrics(workdir / "metrics.jsonl"))], workdir / CURVES_FILE)
