"""The stream loader in training: kill -9 + resume is bitwise, 2 processes read their halves."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from chat_tokenizers import make_tokenizer
from hf_models import save_tiny_llama
from test_resume import assert_resumed_bitwise, kill_9_at, train_losses
from test_trainer import chat_rows

WORKER = Path(__file__).parents[1] / "stream_worker.py"
STEPS = 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny Llama with a ChatML tokenizer, and a two-source mixture with eval files."""
    model_dir, data_dir = tmp_path_factory.mktemp("llama"), tmp_path_factory.mktemp("data")
    save_tiny_llama(model_dir, make_tokenizer("chatml"))
    for seed, name in enumerate(("math", "chat", "math_eval", "chat_eval")):
        rows = chat_rows(60 if "eval" not in name else 8, seed)
        (data_dir / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return model_dir, data_dir


def start(setup, workdir: Path, process: int = 0, processes: int = 1, port: int = 0):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={2 // processes}")  # fmt: skip
    args = [*map(str, (*setup, workdir, STEPS, process, processes, port))]
    return subprocess.Popen([sys.executable, str(WORKER), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def finish(process: subprocess.Popen) -> dict:
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-3000:]
    return json.loads(out.splitlines()[-1])


@pytest.fixture(scope="module")
def uninterrupted(setup, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    return workdir, finish(start(setup, workdir))


@pytest.mark.e2e
def test_kill_9_then_resume_with_a_mixture_equals_uninterrupted(setup, uninterrupted, tmp_path):
    reference = dict(train_losses(uninterrupted[0]))
    assert {"eval/math/loss", "eval/chat/loss", "eval/loss"} <= set(uninterrupted[1]["final_eval"])
    kill_9_at(tmp_path, 4, start(setup, tmp_path))
    assert_resumed_bitwise(tmp_path, finish(start(setup, tmp_path)), reference, STEPS)


@pytest.mark.e2e
def test_two_processes_read_their_halves_and_make_the_same_global_batches(
    setup, uninterrupted, tmp_path
):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    processes = [start(setup, tmp_path / str(p), p, 2, port) for p in range(2)]
    results = [finish(p) for p in processes]
    whole = np.load(uninterrupted[0] / "batches.npy")[:STEPS]
    halves = [np.load(tmp_path / str(p) / "batches.npy")[:STEPS] for p in range(2)]
    np.testing.assert_array_equal(np.concatenate(halves, axis=1), whole)
    read = [r["documents_read"] for r in results]
    one = uninterrupted[1]["documents_read"]
    assert all(0.3 * one < r < 0.7 * one for r in read), (read, one)  # about half each
    reference = uninterrupted[1]["final_eval"]["eval/loss"]
    assert results[0]["final_eval"]["eval/loss"] == pytest.approx(reference, rel=2e-5)
