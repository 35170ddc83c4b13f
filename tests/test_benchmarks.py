"""Every benchmark still runs: each script once, on its tiniest shape, for one step.

Benchmarks are run by hand (figures belong to a GPU/TPU), so nothing else notices when a
refactoring breaks one. Each runs here as it would by hand, on CPU, with flags that make it
as small and short as it goes, and must exit 0 and print its result as a JSON line (the
figures themselves mean nothing at this size). A benchmark added to benchmarks/ without an
entry in TINY fails test_every_benchmark_is_run.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

# script: its flags for the smallest run ({tmp}: a fresh temporary directory).
TINY = {
    "bench_checkpoint.py": ["--dir={tmp}", "--steps=1", "--hidden=64", "--layers=1",
                            "--vocab=256", "--seq=16"],
    "bench_data.py": ["--conversations=40", "--workers=1", "--max_length=256"],
    "bench_data_scale.py": ["--store", "--documents=200"],
    "bench_eval.py": ["--docs=2", "--hidden=32", "--layers=1", "--batch_size=2"],
    "bench_grpo.py": ["--steps=1", "--warmup=1", "--completion=8", "--prompts=2",
                      "--generations=2"],
    "bench_load.py": ["--out={tmp}/checkpoint", "--layers=1", "--devices=1"],
    "bench_long.py": ["--seq=64", "--contexts=1,2", "--hidden=32", "--layers=1", "--vocab=256",
                      "--dtype=float32"],
    "bench_moe.py": ["--tokens=32", "--hidden=32", "--width=16", "--experts=4", "--top_k=2",
                     "--steps=1", "--blocks=qwen3_moe,gpt_oss"],
    "bench_peft.py": ["--base_steps=1", "--steps=1", "--methods=lora", "--batch=2",
                      "--eval_examples=2", "--train_examples=4"],
    "bench_preference.py": ["--batch=2", "--seq=16", "--steps=1", "--hidden=32", "--layers=1",
                            "--vocab=256", "--lora_rank=2"],
    "bench_train.py": ["--shape=micro", "--batch=2", "--seq=16", "--steps=1",
                       "--mode=lora,qlora"],
    "bench_vlm.py": ["--shape=micro", "--batch=2", "--images=1", "--text=4", "--steps=1",
                     "--torch_threads=1"],
    "plan_memory.py": ["--only=small"],
}  # fmt: skip


def test_every_benchmark_is_run():
    assert sorted(TINY) == sorted(p.name for p in BENCHMARKS.glob("*.py"))


@pytest.mark.e2e
@pytest.mark.parametrize("script", sorted(TINY))
def test_benchmark_runs(script, tmp_path):
    flags = [flag.format(tmp=tmp_path) for flag in TINY[script]]
    # As by hand: one CPU device, not conftest's 8 fake ones (batches of 2 rows do not split
    # into 8); the benchmarks that want fake devices ask for them themselves.
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, script, *flags], cwd=BENCHMARKS, capture_output=True, text=True,
        timeout=300, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert any(_json_object(line) for line in result.stdout.splitlines()), (
        f"no JSON result line:\n{result.stdout[-3000:]}"
    )
    if script in FIGURES:
        FIGURES[script](json.loads(result.stdout.splitlines()[-1]))


def _vlm_figures(result: dict) -> None:
    """bench_vlm: both families' images/s, tokens/s (both sides, train and forward) and their
    ratios, positive and finite."""
    assert sorted(result["results"]) == ["gemma3", "qwen2_5_vl"]
    for figures in result["results"].values():
        rates = [k for k in figures if k.endswith(("_per_s", "_ratio"))]
        assert len(rates) == 10, rates
        assert all(math.isfinite(figures[k]) and figures[k] > 0 for k in rates), figures


# script: what its result line must hold, beyond being one.
FIGURES = {"bench_vlm.py": _vlm_figures}


def _json_object(line: str) -> bool:
    """Whether the line is a JSON object (a benchmark's result; not TRL's logged dicts)."""
    try:
        return line.startswith("{") and isinstance(json.loads(line), dict)
    except json.JSONDecodeError:
        return False


def test_tree_rss_counts_a_fork_not_yet_execd_once():
    """bench_data_scale.tree_rss: a child forked but not exec'd (a spawned worker's first
    moments) holds its parent's pages, not more memory; counting it doubled the x32 figure."""
    sys.path.insert(0, str(BENCHMARKS))
    from bench_data_scale import tree_rss

    code = (
        "import os, sys, time\n"
        "held = bytearray(os.urandom(1 << 20) * 150)\n"  # 150 MiB, resident
        "child = os.fork()\n"
        "if child == 0:\n"
        "    time.sleep(30); os._exit(0)\n"
        "print(child, flush=True); time.sleep(30)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
        status = Path(f"/proc/{parent.pid}/status").read_text()
        alone = int(status.split("VmRSS:")[1].split()[0]) / 1024
        assert alone > 150
        assert tree_rss(parent.pid) == pytest.approx(alone, abs=20)
        os.kill(child, 9)
    finally:
        parent.kill()
