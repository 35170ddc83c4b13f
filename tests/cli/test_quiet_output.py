"""A normal run prints our lines, not the libraries' INFO (Orbax's every save and restore,
jax's backend search, transformers' advice); --verbosity=0 brings those back."""

from __future__ import annotations

import shutil

import pytest
from test_reliability import run, straight, train  # noqa: F401 (straight: a fixture)


def info_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


@pytest.mark.e2e
def test_export_and_chat_print_only_our_lines(straight, tmp_path):  # noqa: F811
    copy = tmp_path / "run"
    shutil.copytree(straight, copy)
    exported = run("-m", "sft_jax.export", f"--workdir={copy}", f"--out={tmp_path / 'out'}")
    assert exported.returncode == 0, exported.stderr[-2000:]
    [line] = info_lines(exported.stderr)
    assert "exported step" in line
    chat = run("-m", "sft_jax.chat", f"--workdir={copy}", "--prompt=hi", "--max_new_tokens=4")
    assert chat.returncode == 0, chat.stderr[-2000:]
    assert len(info_lines(chat.stderr)) == 1  # the export of the chosen step, as above
    verbose = run(
        "-m", "sft_jax.export", f"--workdir={copy}", f"--out={tmp_path / 'again'}", "--verbosity=0"
    )
    assert verbose.returncode == 0 and len(info_lines(verbose.stderr)) > 3


@pytest.mark.e2e
def test_a_training_run_shows_no_library_noise_and_logs_it_to_its_workdir(tmp_path):
    result = train(tmp_path / "run", "--config.train.steps=2")
    assert result.returncode == 0, result.stderr[-2000:]
    for noise in ("Unable to initialize backend", "orbax", "PyTorch was not found"):
        assert noise not in result.stderr, noise
    log = (tmp_path / "run" / "log.txt").read_text()
    assert " INFO sft_jax." in log  # ours, as on the terminal
    libraries = [line for line in log.splitlines() if " INFO " in line and " sft_jax." not in line]
    assert any("orbax" in line.lower() for line in libraries)  # theirs, only here
