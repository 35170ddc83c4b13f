"""The offline image-text demo (configs/vlm_demo.py) through main.py, shortened: 4 steps, the
first 16 eval pictures (Parquet rows with their PNG bytes). The eval loss at step 0 equals
transformers' on those conversations (scripts/vlm_answer_match.py, the processor's own output);
the export holds the trained model with the frozen vision tower of the base model, transformers
loads it, and the greedy exact match of the first 4 eval pictures is what transformers' argmax
gives on it."""

from __future__ import annotations

import functools
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import transformers
from safetensors import safe_open

REPO = Path(__file__).resolve().parents[2]
MODEL = REPO / "assets" / "vlm_demo_model"
EVAL = REPO / "assets" / "demo_data" / "vlm" / "eval.parquet"
EXAMPLES = 16


@functools.cache
def _answer_match():
    spec = importlib.util.spec_from_file_location(
        "answer_match", REPO / "scripts/vlm_answer_match.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _reference(model_dir: Path) -> tuple[float, list[bool]]:
    """transformers' mean loss of the first EXAMPLES eval replies (and their <end_of_turn>), and
    per reply whether each of its tokens is the argmax (teacher-forced: greedy answers it)."""
    score = _answer_match().score
    processor = transformers.AutoProcessor.from_pretrained(model_dir)  # an export holds it too
    model = transformers.Gemma3ForConditionalGeneration.from_pretrained(model_dir).eval()
    rows = _answer_match().examples(EVAL)[:EXAMPLES]  # their PNG bytes in the Parquet rows
    scored = [score(model, processor, row, EVAL.parent) for row in rows]
    loss = sum(loss for _, loss, _ in scored) / sum(count for _, _, count in scored)
    return loss, [right for right, _, _ in scored]


@pytest.mark.e2e
def test_vlm_demo_trains_and_exports(tmp_path):
    workdir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "main.py", "--config=configs/vlm_demo.py", f"--workdir={workdir}",
         "--config.train.steps=4", "--config.eval.every_steps=4", "--config.log.every_steps=1",
         "--config.model.train_vision=False",  # the demo trains it; the frozen case exports too
         "--config.checkpoint.every_steps=4", f"--config.data.eval_max_examples={EXAMPLES}",
         "--config.eval.global_batch_size=16", "--config.eval.generate_examples=4",
         f"--config.data.cache_dir={workdir / 'cache'}"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Traceback" not in result.stderr
    # PEFT's count of all parameters: the vision tower's too (frozen or not), as transformers'.
    every = sum(
        p.numel()
        for p in transformers.AutoModelForImageTextToText.from_pretrained(MODEL).parameters()
    )
    assert f"all params: {every:,}" in result.stderr
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval/loss" in r]
    assert [r["step"] for r in evals] == [0, 4]
    assert evals[0]["eval/loss"] == pytest.approx(_reference(MODEL)[0], rel=1e-4)
    assert [r["eval/generated"] for r in evals] == [4, 4]  # greedy replies, with the pictures
    train = [r["train/loss"] for r in records if "train/loss" in r]
    assert len(train) == 4 and train[-1] < train[0]

    export = workdir / "export"
    best = min(evals, key=lambda r: r["eval/loss"])
    loss, rights = _reference(export)
    assert best["eval/loss"] == pytest.approx(loss, rel=1e-4)
    # The trainer's greedy exact match of the first 4 pictures = transformers' on the export.
    assert best["eval/exact_match"] == pytest.approx(np.mean(rights[:4]))
    suffixes = ("embed_tokens.weight", "encoder.layers.0.self_attn.q_proj.weight")
    exported, base = (safe_open(str(d / "model.safetensors"), "np") for d in (export, MODEL))
    with exported, base:
        same = [np.array_equal(_tensor(exported, end), _tensor(base, end)) for end in suffixes]
    assert same == [False, True]  # the decoder trained, the vision tower frozen (by default)


def _tensor(checkpoint, suffix: str) -> np.ndarray:
    """The one tensor whose name ends with suffix (the hub's and transformers' names differ)."""
    names = checkpoint.keys()
    (name,) = [n for n in names if n.endswith(suffix)]
    return checkpoint.get_tensor(name)
