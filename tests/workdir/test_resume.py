"""Preemption: kill -9 + resume equals uninterrupted; SIGTERM saves; export loads in HF."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import ml_collections
import numpy as np
import pytest
import tokenizers
import transformers
from flax import nnx
from hf_models import VOCAB, hf_logits, save_hf_model
from test_models import jax_logits, padded_batch

from sft_jax.loop.export import export_run
from sft_jax.models import from_pretrained
from sft_jax.train.sharding import abstract_like
from sft_jax.workdir.checkpointing import Checkpoints
from sft_jax.workdir.rundir import checkpoint_dir

WORKER = Path(__file__).parents[1] / "train_worker.py"
STEPS = 24


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen3")
    save_hf_model("qwen3", path)
    vocab = {f"t{i}": i for i in range(VOCAB)}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="t0"))
    transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="t2").save_pretrained(
        path
    )
    return path


def start(model_dir: Path, workdir: Path, steps: int = STEPS) -> subprocess.Popen:
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu"
    )
    return subprocess.Popen(
        [sys.executable, str(WORKER), str(model_dir), str(workdir), str(steps)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def finish(process: subprocess.Popen) -> dict:
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-3000:]
    return json.loads(out.splitlines()[-1])


def train_losses(workdir: Path) -> list[tuple[int, float]]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["train/loss"]) for r in map(json.loads, lines) if "train/loss" in r]


def wait_for_step(workdir: Path, step: int, process: subprocess.Popen) -> None:
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        if (workdir / "metrics.jsonl").exists() and any(
            s >= step for s, _ in train_losses(workdir)
        ):
            return
        time.sleep(0.02)
    raise AssertionError(f"the run never reached step {step}")


def wait_for_checkpoint(workdir: Path, step: int, process: subprocess.Popen) -> None:
    """Until a checkpoint of `step` or later is committed (Orbax renames a finished save's
    temporary folder to the bare step number): saves are asynchronous, so reaching a step
    does not mean its checkpoint, or the one before, is on disk yet."""
    deadline = time.time() + 240
    folder = workdir / "checkpoints"
    while time.time() < deadline:
        if folder.exists() and any(p.name.isdigit() and int(p.name) >= step
                                   for p in folder.iterdir()):  # fmt: skip
            return
        if process.poll() is not None:
            break
        time.sleep(0.02)
    raise AssertionError(f"no checkpoint of step {step} or later was committed")


@pytest.fixture(scope="module")
def uninterrupted(model_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    summary = finish(start(model_dir, workdir))
    return workdir, summary


@pytest.mark.e2e
def test_kill_9_then_resume_equals_uninterrupted(model_dir, uninterrupted, tmp_path):
    reference = dict(train_losses(uninterrupted[0]))
    kill_at = random.Random(os.getpid()).randint(3, STEPS - 6)
    kill_9_at(tmp_path, kill_at, start(model_dir, tmp_path))
    summary = finish(start(model_dir, tmp_path))
    assert_resumed_bitwise(tmp_path, summary, reference, STEPS)


def kill_9_at(workdir: Path, step: int, process: subprocess.Popen) -> None:
    """SIGKILL (no cleanup runs) once the run reached `step` and committed a checkpoint."""
    wait_for_step(workdir, step, process)
    wait_for_checkpoint(workdir, 2, process)
    process.send_signal(signal.SIGKILL)
    process.wait()


def assert_resumed_bitwise(workdir: Path, summary: dict, reference: dict, steps: int) -> None:
    """The steps past the checkpoint ran twice; metrics.jsonl keeps each step once, and every
    loss is bitwise the uninterrupted run's (same params, optimizer state and data order)."""
    assert summary["start_step"] >= 2, "a checkpoint should have been there to resume from"
    logged = train_losses(workdir)
    assert [s for s, _ in logged] == list(range(1, steps + 1))
    for step, loss in logged:
        assert loss == reference[step], f"step {step}: {loss} != {reference[step]}"


@pytest.mark.e2e
def test_sigterm_saves_the_step_reached(model_dir, tmp_path):
    process = start(model_dir, tmp_path, steps=400)
    wait_for_step(tmp_path, 3, process)
    process.send_signal(signal.SIGTERM)
    summary = finish(process)
    assert summary["interrupted"] and summary["end_step"] < 400
    checkpoints = Checkpoints(checkpoint_dir(tmp_path), read_only=True)
    assert checkpoints.steps()[-1] == summary["end_step"]
    assert not (tmp_path / "export").exists(), "an interrupted run is not exported"


def nnx_params(model) -> dict:
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def summary_model_dir(workdir: Path) -> str:
    checkpoints = Checkpoints(checkpoint_dir(workdir), read_only=True)
    config = json.loads(checkpoints.meta(checkpoints.steps()[-1])["config"])
    return ml_collections.ConfigDict(config).model.name_or_path


@pytest.mark.e2e
def test_export_loads_in_transformers_with_equal_logits(uninterrupted, tmp_path):
    workdir, summary = uninterrupted
    export_dir = Path(summary["export"])
    checkpoints = Checkpoints(checkpoint_dir(workdir), read_only=True)
    assert summary["best_step"] in checkpoints.steps()
    # The trained model: the best checkpoint's parameters on the base model's structure.
    structure = from_pretrained(summary_model_dir(workdir))
    params = checkpoints.restore_params(summary["best_step"], abstract_like(nnx_params(structure)))
    trained = nnx.merge(nnx.graphdef(structure), params)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(
        export_dir, attn_implementation="eager"
    )
    batch = padded_batch(seed=5)
    expected = hf_logits(reloaded.float().eval(), batch["input_ids"], batch["attention_mask"])
    valid = batch["attention_mask"].astype(bool)
    np.testing.assert_allclose(
        jax_logits(trained, batch)[valid], expected[valid], atol=1e-4 * np.abs(expected).max()
    )
    assert transformers.AutoTokenizer.from_pretrained(export_dir).eos_token == "t2"
    # The export command picks the same checkpoint and writes the same weights.
    again = export_run(workdir, which=summary["best_step"], out=tmp_path / "again")
    assert (again / "model.safetensors").read_bytes() == (
        export_dir / "model.safetensors"
    ).read_bytes()
