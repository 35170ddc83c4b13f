"""The tool-use demo (configs/tools_demo.py) end to end, shortened: it runs, learns the format.

The full run (800 updates, README "Reasoning and tool calls") takes exact match of the emitted
tool-call JSON from 0% to >= 90%; here 40 updates show the eval loss falling and the samples
holding tool calls, in about a minute.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.e2e
def test_tools_demo_trains_on_tool_conversations(tmp_path):
    workdir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "main.py", "--config=configs/tools_demo.py", f"--workdir={workdir}",
         "--config.train.steps=40", "--config.eval.every_steps=40",
         "--config.checkpoint.enabled=False", "--config.export.at_end=none",
         "--config.data.eval_max_examples=32", "--config.eval.generate_examples=8",
         f"--config.data.cache_dir={workdir / 'cache'}"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    assert "mask certificate of 64 examples" in result.stderr
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval/loss" in r]
    assert [r["step"] for r in evals] == [0, 40]
    assert evals[0]["eval/exact_match"] == 0.0
    assert evals[-1]["eval/loss"] < evals[0]["eval/loss"] / 2  # 5.93 -> 1.81 in one run
    assert '>>> reference: <tool_call>{"name": "calculator"' in evals[-1]["eval/samples"]
