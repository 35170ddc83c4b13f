"""The experiment trackers (workdir/trackers.py) hold what metrics.jsonl holds, read back with
each library's own reader; a resume continues the same tracker run; a tracker that cannot
start is one warning; curves.png and `python -m sft_jax.report` draw the runs."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from configs import base
from sft_jax.cli.report import report
from sft_jax.core.errors import ConfigError, UsageError
from sft_jax.core.spec import TRACKERS, RunSpec
from sft_jax.generation.samples import SAMPLE_COLUMNS, sample_rows
from sft_jax.workdir import trackers as run_trackers
from sft_jax.workdir.metrics import MetricsWriter
from sft_jax.workdir.tracker_backends import BACKENDS, mlflow_key

WORKER = Path(__file__).parents[1] / "tracking_worker.py"
PNG = b"\x89PNG\r\n\x1a\n"


def local_stores(root: Path) -> dict[str, str]:
    """Every tracker's files under `root`, offline: nothing goes to $HOME or the network."""
    (root / "home").mkdir(parents=True)
    return {
        "HOME": str(root / "home"),
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(root),
        "WANDB_CACHE_DIR": str(root / "wandb_cache"),
        "WANDB_CONFIG_DIR": str(root / "wandb_config"),
        "WANDB_DATA_DIR": str(root / "wandb_data"),
        "TRACKIO_DIR": str(root / "trackio"),
        "MLFLOW_TRACKING_URI": "",  # the default: sqlite:///WORKDIR/mlflow.db
    }


@pytest.fixture(scope="module")
def tracked(tmp_path_factory) -> tuple[Path, dict[str, str], list[dict]]:
    """(WORKDIR, the stores' env, the summaries) of 2 demo steps, then 2 more resumed."""
    root = tmp_path_factory.mktemp("tracked")
    env = dict(os.environ, JAX_PLATFORMS="cpu", **local_stores(root))
    env.pop("XLA_FLAGS", None)  # one CPU device
    # The resumed run's steps compile to the same programs: read them back, not compiled again.
    env["JAX_COMPILATION_CACHE_DIR"] = str(root / "jax_cache")
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    command = [sys.executable, str(WORKER), str(root / "run")]
    result = subprocess.run(command, env=env, cwd=root, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    summaries = json.loads(next(ln for ln in result.stdout.splitlines() if ln.startswith("[{")))
    return root / "run", env, summaries


def logged(workdir: Path) -> tuple[dict[tuple[int, str], float], dict[int, str]]:
    """metrics.jsonl's numbers by (step, key), and its eval/samples texts by step."""
    numbers, samples = {}, {}
    for record in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines()):
        for key, value in record.items():
            if isinstance(value, str):
                samples[record["step"]] = value
            elif key != "step":
                numbers[record["step"], key] = float(value)
    return numbers, samples


def wandb_history(run_file: Path) -> dict[tuple[int, str], object]:
    """(step, key) -> value of an offline run's .wandb file, read by wandb's own reader."""
    wandb = Path(sys.executable).parent / "wandb"
    command = [str(wandb), "leet", "inspect", "--json", str(run_file)]
    out = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout
    history = {}
    for record in map(json.loads, out.splitlines()):
        if record.get("type") == "history":
            step = int(record["history"]["step"]["num"])
            history |= {(step, k): v for k, v in record["history"]["item"].items()}
    return history


@pytest.mark.e2e
def test_wandb_offline_run_holds_every_metric_and_the_resume_continues_it(tracked):
    workdir, env, _ = tracked
    numbers, samples = logged(workdir)
    run_id = json.loads((workdir / "trackers.json").read_text())["wandb"]
    runs = sorted((Path(env["WANDB_DIR"]) / "wandb").glob("offline-run-*"))
    assert [r.name.rsplit("-", 1)[1] for r in runs] == [run_id, run_id]  # first, resumed
    first, resumed = (wandb_history(run / f"run-{run_id}.wandb") for run in runs)
    assert {s for s, _ in first} == {0, 1, 2} and {s for s, _ in resumed} == {3, 4}
    history = first | resumed
    for (step, key), value in numbers.items():
        assert history[step, key] == pytest.approx(value, rel=1e-12), (step, key)
    for step, text in samples.items():  # the eval samples, as a table
        [table] = (runs[step > 2] / "files/media/table/eval").glob(f"samples_{step}_*.table.json")
        saved = json.loads(table.read_text())
        assert saved["columns"] == list(SAMPLE_COLUMNS)
        assert saved["data"] == sample_rows(text) and len(saved["data"]) == 2


@pytest.mark.e2e
def test_trackio_store_holds_every_metric_in_one_run(tracked):
    workdir, env, _ = tracked
    numbers, samples = logged(workdir)
    read = (
        "import json; from trackio.sqlite_storage import SQLiteStorage as S; "
        "print(json.dumps([S.get_runs('sft_jax'), S.get_logs('sft_jax', run='run')], default=str))"
    )
    command = [sys.executable, "-c", read]
    out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, check=True)
    runs, logs = json.loads(out.stdout.splitlines()[-1])
    assert runs == ["run"]  # the resume logged to the same run
    stored = {(int(r["step"]), k): v for r in logs for k, v in r.items() if k != "step"}
    for (step, key), value in numbers.items():
        assert float(stored[step, key]) == pytest.approx(value, rel=1e-12), (step, key)
    for step, text in samples.items():
        table = stored[step, "eval/samples"]
        assert [list(row.values()) for row in table["_value"]] == sample_rows(text)


@pytest.mark.e2e
def test_mlflow_store_holds_every_metric_in_one_run(tracked):
    from mlflow import MlflowClient

    workdir, _, _ = tracked
    numbers, samples = logged(workdir)
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("sft_jax")
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.run_id == json.loads((workdir / "trackers.json").read_text())["mlflow"]
    assert run.info.status == "FINISHED" and run.data.params["train.global_batch_size"] == "8"
    for key in {key for _, key in numbers}:
        history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
        expected = {step: value for (step, k), value in numbers.items() if k == key}
        assert history == pytest.approx(expected, rel=1e-12), key
    tables = client.list_artifacts(run.info.run_id, "eval/samples")
    assert len(tables) == len(samples) == 3  # steps 0, 2 and 4


@pytest.mark.e2e
def test_curves_and_the_report_draw_the_runs(tracked, tmp_path):
    from matplotlib import pyplot as plt

    workdir, _, summaries = tracked
    assert [s["curves"] for s in summaries] == [str(workdir / "curves.png")] * 2
    assert (workdir / "curves.png").read_bytes().startswith(PNG)
    assert plt.imread(workdir / "curves.png").shape[1] == 1500  # three panels, 5 inches each
    other = tmp_path / "other"
    other.mkdir()
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    (other / "metrics.jsonl").write_text("\n".join(lines[:4]) + "\n")
    out = report([str(workdir), str(other)], tmp_path / "both.png")
    assert out.read_bytes().startswith(PNG) and plt.imread(out).shape[1] == 1500
    with pytest.raises(UsageError, match=r"no metrics\.jsonl there"):
        report([str(tmp_path / "missing")], tmp_path / "x.png")


def test_a_tracker_that_cannot_start_is_one_warning_and_the_others_log(tmp_path, caplog):
    config = base.get_config()
    config.log.trackers = "tensorboard,mlflow"
    config.log.mlflow_tracking_uri = "nowhere://at/all"  # no such store
    spec = RunSpec.of(config)
    with caplog.at_level(logging.WARNING):
        started = run_trackers.RunTrackers.start(spec, tmp_path, {"devices": 1})
    [warning] = [r.getMessage() for r in caplog.records if r.name == run_trackers.log.name]
    assert warning.startswith("tracker mlflow could not start (") and "\n" not in warning
    assert list(started.trackers) == ["tensorboard"]
    started.log({"step": 1, "train/loss": 2.5})
    started.finish()
    assert json.loads((tmp_path / "trackers.json").read_text()) == {"tensorboard": "tensorboard"}
    assert any((tmp_path / "tensorboard").iterdir())


def test_a_tracker_that_fails_later_is_dropped_with_one_warning(tmp_path, caplog, monkeypatch):
    class Broken:
        def start(self, run):
            return "broken-1"

        def log(self, step, scalars, texts):
            raise ConnectionError("the server went away\nsecond line")

    monkeypatch.setitem(BACKENDS, "tensorboard", Broken)
    spec = RunSpec.of(base.get_config())
    started = run_trackers.RunTrackers.start(spec, tmp_path, {})
    with caplog.at_level(logging.WARNING):
        started.log({"step": 1, "train/loss": 2.5})
        started.log({"step": 2, "train/loss": 2.4})
    [warning] = [r.getMessage() for r in caplog.records if r.name == run_trackers.log.name]
    assert "tracker tensorboard failed in log (ConnectionError: the server went away)" in warning
    assert started.trackers == {}


def test_tracker_names_from_a_list_or_a_comma_string():
    config = base.get_config()
    assert RunSpec.of(config).log.tracker_names() == ("tensorboard",)
    config.log.trackers = ("wandb", "mlflow,trackio")  # as --config.log.trackers=a,b gives it
    assert RunSpec.of(config).log.tracker_names() == ("wandb", "mlflow", "trackio")
    config.log.trackers = ""
    assert RunSpec.of(config).log.tracker_names() == ()
    config.log.trackers = "tensorboard,neptune"
    with pytest.raises(ConfigError, match=r"config\.log\.trackers='neptune': expected one of"):
        RunSpec.of(config).log.tracker_names()
    assert tuple(BACKENDS) == TRACKERS


def test_samples_text_becomes_rows_and_metric_names_fit_mlflow():
    text = (
        "--- sample 0 (match)\n<user>\nWhat is 2+2?\n>>> model: 4\n>>> reference: 4\n"
        "--- sample 1 (differs)\n<user> hi\n>>> model: two\nlines\n>>> reference: hello"
    )
    assert sample_rows(text) == [
        [0, "match", "<user>\nWhat is 2+2?", "4", "4"],
        [1, "differs", "<user> hi", "two\nlines", "hello"],
    ]
    assert mlflow_key("eval/pass@1") == "eval/pass_at_1"
    assert mlflow_key("train/rewards/my-reward.v2/mean") == "train/rewards/my-reward.v2/mean"


class Recorder:
    """A tracker that keeps what it is given."""

    def __init__(self):
        self.scalars, self.tables = {}, []

    def start(self, run):
        return "recorded"

    def log(self, step, scalars, texts):
        self.scalars |= {(step, key): value for key, value in scalars.items()}

    def table(self, step, key, columns, rows):
        self.tables.append((step, key, tuple(columns), rows))

    def finish(self):
        pass


def test_steps_a_resume_repeats_are_not_sent_twice(tmp_path):
    recorder = Recorder()
    writer = MetricsWriter(tmp_path, trackers=lambda: run_trackers.RunTrackers(tmp_path, {}))
    writer.trackers.trackers["recorder"] = recorder
    for step in range(1, 5):
        writer.write(step, {"train/loss": 10.0 - step})
    writer.close()
    # A kill after step 4, a checkpoint at step 2: the resume runs steps 3 and 4 again.
    resumed = Recorder()
    writer = MetricsWriter(tmp_path, trackers=lambda: run_trackers.RunTrackers(tmp_path, {}))
    writer.trackers.trackers["recorder"] = resumed
    writer.drop_after(2)
    for step in range(3, 6):
        writer.write(step, {"train/loss": 10.0 - step})
    writer.close()
    assert resumed.scalars == {(5, "train/loss"): 5.0}
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").open()]
    assert steps == [1, 2, 3, 4, 5]


def test_the_newest_rollouts_completions_are_a_table_at_each_eval(tmp_path):
    def completion(step, index):
        texts = {"prompt": f"q{index}", "completion": f"a{step}{index}"}
        return {
            "step": step,
            "prompt_index": index,
            **texts,
            "rewards": {"math": 1.0},
            "advantage": 0.5,
        }

    path = tmp_path / run_trackers.COMPLETIONS_FILE
    path.write_text("".join(json.dumps(completion(s, i)) + "\n" for s in (1, 2) for i in (0, 1)))
    recorder = Recorder()
    started = run_trackers.RunTrackers(tmp_path, {"recorder": recorder})
    started.log({"step": 2, "train/loss": 1.0})  # no eval: no table
    started.log({"step": 2, "eval/reward": 0.5})
    started.log({"step": 2, "eval/reward": 0.5})  # nothing new since
    [(step, key, columns, rows)] = recorder.tables
    assert (step, key, columns) == (2, "train/completions", run_trackers.COMPLETION_COLUMNS)
    rewards = '{"math": 1.0}'
    assert rows == [[2, 0, "q0", "a20", rewards, 0.5], [2, 1, "q1", "a21", rewards, 0.5]]
