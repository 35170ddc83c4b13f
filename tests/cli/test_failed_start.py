"""A run that stops on a config or data error before training leaves nothing behind: no lock
file, and no empty WORKDIR where the run created it."""

from __future__ import annotations

import pytest
from test_reliability import assert_one_line_error, train


@pytest.mark.e2e
@pytest.mark.parametrize(
    "override, expected",
    [
        ("--config.data.train_files=/no/such/train.jsonl", "/no/such/train.jsonl"),
        ("--config.train.learning_rate=-1.0", "config.train.learning_rate"),
    ],
)
def test_an_error_before_training_leaves_no_workdir_and_no_lock(tmp_path, override, expected):
    fresh = tmp_path / "new_run"
    assert_one_line_error(train(fresh, override), expected)
    assert not fresh.exists()
    kept = tmp_path / "old_run"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    assert_one_line_error(train(kept, override), expected)
    assert sorted(p.name for p in kept.iterdir()) == ["notes.txt"]
