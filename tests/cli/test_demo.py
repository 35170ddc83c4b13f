"""The offline demo end to end through main.py: train, eval, samples, checkpoint, export, reload.

A shortened configs/base.py run (fewer steps, a slice of the eval set) so the suite stays quick;
the full demo is what the README shows.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import transformers
from safetensors import safe_open
from test_trainer import reference_eval_loss

from sft_jax.core.spec import RunSpec

REPO = Path(__file__).resolve().parents[2]
DEMO_MODEL = REPO / "assets" / "demo_model"


def run_demo(workdir: Path, *overrides: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "main.py", "--config=configs/base.py", f"--workdir={workdir}",
         "--config.train.steps=60", "--config.eval.every_steps=30",
         "--config.checkpoint.every_steps=30", "--config.data.eval_max_examples=64",
         "--config.eval.generate_examples=16", "--config.eval.max_new_tokens=16",
         f"--config.data.cache_dir={workdir / 'cache'}", *overrides],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Traceback" not in result.stderr
    return result


def logged(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.e2e
def test_demo_trains_evaluates_checkpoints_and_exports_for_transformers(tmp_path):
    workdir = tmp_path / "run"
    result = run_demo(workdir)
    records = logged(workdir)
    evals = [r for r in records if "eval/loss" in r]
    assert [r["step"] for r in evals] == [0, 30, 60]
    assert all(r["eval/generated"] == 16 and 0 <= r["eval/exact_match"] <= 1 for r in evals)
    assert evals[0]["eval/exact_match"] == 0.0  # random weights answer nothing right
    assert evals[-1]["eval/loss"] < evals[0]["eval/loss"] / 2  # it learns within 60 steps
    assert "--- sample 0" in evals[-1]["eval/samples"] and ">>> model:" in evals[-1]["eval/samples"]
    train = [r for r in records if "train/loss" in r]
    assert train[-1]["train/loss"] < 0.6 * train[0]["train/loss"]

    # The final report (stderr: absl logging) says what changed.
    assert "eval loss" in result.stderr and "exact match of greedy replies" in result.stderr
    assert f"exported to {workdir / 'export'}" in result.stderr

    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps[-1] == 60

    # The export is a Hugging Face directory transformers loads as is, with the chat template.
    export = workdir / "export"
    for name in ("config.json", "generation_config.json", "tokenizer.json"):
        assert (export / name).is_file(), name
    tokenizer = transformers.AutoTokenizer.from_pretrained(export)
    demo_tokenizer = transformers.AutoTokenizer.from_pretrained(DEMO_MODEL)
    assert tokenizer.chat_template == demo_tokenizer.chat_template
    model = transformers.AutoModelForCausalLM.from_pretrained(export)
    assert type(model).__name__ == "LlamaForCausalLM"
    with safe_open(str(next(export.glob("*.safetensors"))), "np") as f:
        trained = f.get_tensor("model.embed_tokens.weight")
    with safe_open(str(DEMO_MODEL / "model.safetensors"), "np") as f:
        assert not np.array_equal(trained, f.get_tensor("model.embed_tokens.weight"))

    # Its eval loss, computed by transformers on the eval set tokenized with the exported
    # tokenizer, is the eval loss logged at the exported (best) step.
    from configs import base
    from sft_jax.data import open_data

    best = min(evals, key=lambda r: r["eval/loss"])
    config = base.get_config()
    config.unlock()
    config.model.name_or_path = str(export)
    config.data.eval_max_examples = 64
    config.data.cache_dir = "none"
    source = open_data(RunSpec.of(config))
    expected = reference_eval_loss(export, source.eval_batches())
    assert best["eval/loss"] == pytest.approx(expected, rel=1e-4)

    # Fine-tune the fine-tune: a new run starts from this run's best parameters, with a fresh
    # optimizer at step 0, and leaves this run's checkpoints as they were.
    before = sorted((p.name, p.stat().st_mtime_ns) for p in (workdir / "checkpoints").iterdir())
    second = tmp_path / "second"
    result = run_demo(
        second, f"--config.checkpoint.init_from={workdir}", "--config.train.steps=10",
        "--config.eval.every_steps=10", "--config.eval.generate_examples=0",
        "--config.eval.show_samples=0",
    )  # fmt: skip
    assert f"initialized parameters from {workdir / 'checkpoints'}, step {best['step']}" in (
        result.stderr
    )
    evals = [r for r in logged(second) if "eval/loss" in r]
    assert [r["step"] for r in evals] == [0, 10]
    assert evals[0]["eval/loss"] == pytest.approx(best["eval/loss"], rel=1e-6)
    after = sorted((p.name, p.stat().st_mtime_ns) for p in (workdir / "checkpoints").iterdir())
    assert after == before

    # A source that does not fit, or holds nothing, is one clear message.
    for init_from, message in (
        (workdir, "that run trained other parameters (lora.rank: 0 -> 4)"),
        (tmp_path / "nothing", "does not exist; give the WORKDIR of a run that saved"),
    ):
        failed = subprocess.run(
            [sys.executable, "main.py", "--config=configs/base.py", f"--workdir={tmp_path / 'x'}",
             f"--config.checkpoint.init_from={init_from}", "--config.lora.rank=4",
             f"--config.data.cache_dir={workdir / 'cache'}"],
            cwd=REPO, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert failed.returncode != 0 and message in failed.stderr, failed.stderr[-2000:]
        assert "Traceback" not in failed.stderr


@pytest.mark.e2e
def test_qlora_on_the_demo_data_lowers_the_loss(tmp_path):
    """NF4 base + rank-16 adapters. The demo base is random: its frozen (tied) head bounds the
    logits to about +-2.6, so adapters alone stall near 5.2; the head is trained in full too, as
    when a chat format adds tokens (with tied embeddings that is the embedding matrix)."""
    workdir = tmp_path / "qlora"
    result = run_demo(
        workdir, "--config.lora.rank=16", "--config.lora.quantize=nf4", "--config.lora.dropout=0.0",
        "--config.train.learning_rate=3e-3", "--config.lora.trainable_modules=lm_head",
        "--config.eval.generate_examples=0", "--config.eval.show_samples=0",
    )  # fmt: skip
    assert "the LM head is tied to the embedding" in result.stderr
    records = logged(workdir)
    evals = [r["eval/loss"] for r in records if "eval/loss" in r]
    assert len(evals) == 3 and evals[2] < evals[1] < evals[0]
    assert evals[-1] < 0.5 * evals[0]
    train = [r["train/loss"] for r in records if "train/loss" in r]
    assert train[-1] < 0.6 * train[0]
    # Exported as a PEFT adapter plus the merged model.
    assert (workdir / "export" / "adapter" / "adapter_config.json").is_file()
    assert (workdir / "export" / "adapter" / "adapter_model.safetensors").is_file()
    assert (workdir / "export" / "config.json").is_file()
