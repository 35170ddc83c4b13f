"""python -m sft_jax.evaluate over two processes (jax.distributed on loopback, gloo; 2 CPU
devices each, the model sharded over all 4) gives a single process's results: every
request's response and every metric (floats rel 1e-5: the sharded sums differ in rounding
only), written once, by process 0."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from lm_eval import simple_evaluate
from lm_eval.tasks import TaskManager
from tiny_tasks import TASKS, save_model, write_tasks

from sft_jax.evaluation.harness import SftJaxLM


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _evaluate(files, out, processes: int) -> None:
    """The CLI on the tiny model and tasks, in `processes` processes, each writing (if it
    writes) to OUT/<process>."""
    port = _free_port()
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    command = [
        sys.executable, "-m", "sft_jax.evaluate", f"--model={files / 'model'}",
        f"--tasks={','.join(TASKS)}", f"--include_path={files / 'tasks'}", "--nobuiltin_tasks",
        "--batch_size=4", "--log_samples", "--bootstrap_iters=0",
    ]  # fmt: skip
    if processes > 1:
        command += [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={processes}"]
        command += ["--cpu_collectives=gloo"]
    procs = [
        subprocess.Popen(
            [*command, f"--process_id={i}", f"--output_path={out / str(i)}"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(processes)
    ]
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=400)
        assert proc.returncode == 0, stderr[-3000:]
        assert ("tiny_mc" in stdout) == (proc is procs[0])  # process 0 prints the table


def _same(ours, reference) -> None:
    """Equal, floats to rel 1e-5, through lists and dicts."""
    if isinstance(reference, float):
        np.testing.assert_allclose(ours, reference, rtol=1e-5)
    elif isinstance(reference, (list, tuple)):
        assert len(ours) == len(reference)
        for a, b in zip(ours, reference, strict=True):
            _same(a, b)
    elif isinstance(reference, dict):
        assert ours.keys() == reference.keys()
        for key in reference:
            _same(ours[key], reference[key])
    else:
        assert ours == reference


@pytest.mark.e2e
def test_two_processes_equal_one(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "tasks").mkdir()
    save_model(tmp_path / "model")
    write_tasks(tmp_path / "tasks", docs=3)
    _evaluate(tmp_path, tmp_path / "two", processes=2)
    assert not (tmp_path / "two" / "1").exists()  # written once, by process 0
    written = tmp_path / "two" / "0"
    one = simple_evaluate(  # one process, the model on one device
        model=SftJaxLM(str(tmp_path / "model"), batch_size=4), tasks=list(TASKS),
        task_manager=TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False),
        log_samples=True, bootstrap_iters=0,
    )  # fmt: skip
    _same(json.loads((written / "results.json").read_text())["results"], one["results"])
    assert one["results"]["tiny_gen"]["sample_len"] == 3
    for task in TASKS:
        two = [json.loads(line) for line in (written / f"samples_{task}.jsonl").open()]
        for field in ("resps", "filtered_resps"):
            _same([row[field] for row in two], [row[field] for row in one["samples"][task]])
