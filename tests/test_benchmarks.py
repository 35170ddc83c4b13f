"""The benchmarks still start: each one's imports and argument parser, without measuring.

Benchmarks are run by hand (figures belong to a GPU/TPU), so nothing else notices when a
refactoring breaks one; `--help` loads every module a benchmark needs and exits.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.e2e
@pytest.mark.parametrize("script", sorted(p.name for p in BENCHMARKS.glob("bench_*.py")))
def test_benchmark_starts(script):
    result = subprocess.run(
        [sys.executable, script, "--help"], cwd=BENCHMARKS, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "usage:" in result.stdout
