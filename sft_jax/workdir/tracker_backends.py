"""The experiment trackers a run can log to (config.log.trackers), one class each.

Each takes the same calls from workdir/trackers.py: `start(run)` returns the id that resumes
the same tracker run later (kept in WORKDIR/trackers.json), `log(step, scalars, texts)`,
`table(step, key, columns, rows)`, `finish()`. The libraries are imported in `start`, so a
missing one is a tracker that cannot start, not an import error of sft_jax.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol


@dataclasses.dataclass(frozen=True)
class TrackedRun:
    """What every tracker is told of the run at its start."""

    workdir: Path
    name: str
    config: dict[str, Any]  # the run's config (RunSpec.to_dict()) and its setup figures
    project: str
    wandb_entity: str
    mlflow_tracking_uri: str
    saved_id: str | None  # the id this tracker returned last time in this WORKDIR (a resume)


class Tracker(Protocol):
    def start(self, run: TrackedRun) -> str: ...

    def log(self, step: int, scalars: dict[str, float], texts: dict[str, str]) -> None: ...

    def table(self, step: int, key: str, columns: Sequence[str], rows: list[list[Any]]) -> None: ...

    def finish(self) -> None: ...


class TensorBoard:
    """WORKDIR/tensorboard (tensorboardX): scalars, and texts in the text tab."""

    def start(self, run: TrackedRun) -> str:
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(str(run.workdir / "tensorboard"))
        if run.saved_id is None:
            self.writer.add_text("config", _markdown_json(run.config), 0)
        return "tensorboard"

    def log(self, step: int, scalars: dict[str, float], texts: dict[str, str]) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)
        for key, text in texts.items():
            self.writer.add_text(key, text, step)
        self.writer.flush()

    def table(self, step: int, key: str, columns: Sequence[str], rows: list[list[Any]]) -> None:
        del step, key, columns, rows  # the text the table was made of is in the text tab

    def finish(self) -> None:
        self.writer.close()


class WandB:
    """Weights & Biases; WANDB_MODE=offline keeps the run in WANDB_DIR (default WORKDIR)."""

    def start(self, run: TrackedRun) -> str:
        import wandb

        self.wandb = wandb
        self.run = wandb.init(
            project=run.project,
            entity=run.wandb_entity or None,
            name=run.name,
            id=run.saved_id or uuid.uuid4().hex[:12],
            resume="allow",
            config=run.config,
            dir=None if os.environ.get("WANDB_DIR") else str(run.workdir),
            # Our log lines already go to WORKDIR/log.txt; no second capture of the terminal.
            # A terminal without a W&B key is asked for one: a minute, then a warning.
            settings=wandb.Settings(console="off", login_timeout=60.0),
        )
        return self.run.id

    def log(self, step: int, scalars: dict[str, float], texts: dict[str, str]) -> None:
        del texts  # logged as tables
        self.run.log(scalars, step=step)

    def table(self, step: int, key: str, columns: Sequence[str], rows: list[list[Any]]) -> None:
        self.run.log({key: self.wandb.Table(columns=list(columns), data=rows)}, step=step)

    def finish(self) -> None:
        self.run.finish()


class Trackio:
    """Hugging Face trackio: a local SQLite store in $TRACKIO_DIR (default HF_HOME/trackio)."""

    def start(self, run: TrackedRun) -> str:
        import trackio

        self.trackio = trackio
        # trackio finds the run to resume by its name.
        self.run = trackio.init(
            project=run.project,
            name=run.saved_id or run.name,
            config=run.config,
            resume="allow",
            embed=False,
        )
        return self.run.name

    def log(self, step: int, scalars: dict[str, float], texts: dict[str, str]) -> None:
        del texts  # logged as tables
        self.run.log(scalars, step=step)

    def table(self, step: int, key: str, columns: Sequence[str], rows: list[list[Any]]) -> None:
        self.run.log({key: self.trackio.Table(columns=list(columns), data=rows)}, step=step)

    def finish(self) -> None:
        self.run.finish()


class MLflow:
    """MLflow: params from the config, metrics by step, tables as JSON artifacts."""

    def start(self, run: TrackedRun) -> str:
        from mlflow import MlflowClient

        uri = run.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
        self.client = MlflowClient(uri or f"sqlite:///{run.workdir.resolve() / 'mlflow.db'}")
        if run.saved_id is not None:
            self.run_id = self.client.get_run(run.saved_id).info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
            return self.run_id
        experiment = self.client.get_experiment_by_name(run.project)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            artifacts = None if uri else (run.workdir.resolve() / "mlruns").as_uri()
            experiment_id = self.client.create_experiment(run.project, artifacts)
        self.run_id = self.client.create_run(experiment_id, run_name=run.name).info.run_id
        self._params(run.config)
        return self.run_id

    def _params(self, config: dict[str, Any]) -> None:
        from mlflow.entities import Param

        flat = [Param(k, str(v)[:500]) for k, v in _flatten(config).items()]
        for start in range(0, len(flat), 100):  # MLflow takes 100 params a call
            self.client.log_batch(self.run_id, params=flat[start : start + 100])
        self.client.log_dict(self.run_id, config, "config.json")

    def log(self, step: int, scalars: dict[str, float], texts: dict[str, str]) -> None:
        from mlflow.entities import Metric

        del texts  # logged as tables
        now = int(time.time() * 1000)
        metrics = [Metric(mlflow_key(k), v, now, step) for k, v in scalars.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def table(self, step: int, key: str, columns: Sequence[str], rows: list[list[Any]]) -> None:
        data = {column: [row[i] for row in rows] for i, column in enumerate(columns)}
        self.client.log_table(self.run_id, data, f"{mlflow_key(key)}/step_{step:08d}.json")

    def finish(self) -> None:
        self.client.set_terminated(self.run_id)


def mlflow_key(key: str) -> str:
    """A metric name as MLflow accepts it: letters, digits, _ - . : / and spaces only
    (eval/pass@1 -> eval/pass_at_1)."""
    return re.sub(r"[^A-Za-z0-9_\-.:/ ]", "_", key.replace("@", "_at_"))


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat |= _flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _markdown_json(tree: dict[str, Any]) -> str:
    return "```\n" + json.dumps(tree, indent=2) + "\n```"


BACKENDS: dict[str, type] = {
    "tensorboard": TensorBoard,
    "wandb": WandB,
    "trackio": Trackio,
    "mlflow": MLflow,
}
