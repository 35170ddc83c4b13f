"""Bad input, bad state and faults, through the real commands: one clear line and a non-zero
exit (or a counted warning), never a traceback, and nothing already saved is lost."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ASSETS = REPO / "assets"
# A short demo run: 8 rows a step, no generation, eval on 8 examples, no export.
FAST = (
    "--config.train.global_batch_size=8", "--config.eval.global_batch_size=8",
    "--config.data.eval_max_examples=8", "--config.eval.generate_examples=0",
    "--config.eval.show_samples=0", "--config.eval.at_start=False", "--config.eval.every_steps=0",
    "--config.export.at_end=none", "--config.log.every_steps=1",
)  # fmt: skip


def command(*argv: str, workdir: Path | None = None, shell_prefix: str = "") -> list[str]:
    args = [sys.executable, *argv]
    if workdir is not None:
        args.append(f"--workdir={workdir}")
    if shell_prefix:  # e.g. a ulimit for this command alone
        return ["bash", "-c", f"{shell_prefix}; exec " + " ".join(map(_quote, args))]
    return args


def _quote(arg: str) -> str:
    return "'" + arg.replace("'", "'\\''") + "'"


def run(*argv: str, workdir: Path | None = None, shell_prefix: str = "", timeout: int = 240):
    return subprocess.run(
        command(*argv, workdir=workdir, shell_prefix=shell_prefix),
        cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


def train(workdir: Path, *overrides: str, shell_prefix: str = "") -> subprocess.CompletedProcess:
    return run("main.py", "--config=configs/base.py", *FAST, *overrides, workdir=workdir,
               shell_prefix=shell_prefix)  # fmt: skip


def assert_one_line_error(result: subprocess.CompletedProcess, *expected: str) -> str:
    assert result.returncode != 0, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-4000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-2000:]
    for text in expected:
        assert text in errors[0], errors[0]
    return errors[0]


def train_losses(workdir: Path) -> dict[int, float]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["train/loss"] for r in map(json.loads, lines) if "train/loss" in r}


def saved_steps(workdir: Path) -> list[int]:
    folder = workdir / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())


def conversation(reply: str) -> dict:
    return {"messages": [{"role": "user", "content": "What is 2 plus 2?"},
                         {"role": "assistant", "content": reply}]}  # fmt: skip


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """4 uninterrupted steps, a checkpoint every 2: the reference of the resume tests."""
    workdir = tmp_path_factory.mktemp("straight")
    result = train(workdir, "--config.train.steps=4", "--config.checkpoint.every_steps=2")
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


# --- Bad input -------------------------------------------------------------------------------


@pytest.mark.e2e
def test_empty_assistant_replies_are_counted_and_named(tmp_path):
    rows = [conversation("4"), conversation(""), conversation("  "), conversation("4")]
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    result = train(tmp_path / "run", "--config.train.steps=1", f"--config.data.train_files={data}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"2 examples have an empty assistant reply (the first at {data}:2)" in result.stderr
    inspect = ("-m", "sft_jax.data.inspect", "--config=configs/base.py")
    error = run(*inspect, f"--config.data.train_files={data}", "--config.data.empty_replies=error")
    assert_one_line_error(error, f"{data}:2: an assistant reply is empty")
    skipped = run(*inspect, "--json", f"--config.data.train_files={data}",
                  "--config.data.empty_replies=skip")  # fmt: skip
    assert skipped.returncode == 0, skipped.stderr[-2000:]
    assert json.loads(skipped.stdout)["train"]["dropped"] == {"empty_reply": 2}


@pytest.mark.e2e
def test_a_corrupt_parquet_file_is_named(tmp_path):
    data = tmp_path / "train.parquet"
    data.write_bytes(b"PAR1" + os.urandom(200) + b"PAR1")
    result = train(tmp_path / "run", f"--config.data.train_files={data}")
    assert_one_line_error(result, f"{data}: not a readable Parquet file")


@pytest.mark.e2e
def test_a_byte_that_is_not_utf8_is_named_with_its_line(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_bytes(json.dumps(conversation("4")).encode() + b'\n{"messages": "caf\xe9"}\n')
    result = train(tmp_path / "run", f"--config.data.train_files={data}")
    assert_one_line_error(result, f"{data}:2: not UTF-8 text (byte 0xe9", "skip_bad_examples")


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--config=configs/base.py", "--workdir=WORK", "--config.train.steps=abc"],
         "--config.train.steps=abc: invalid literal for int()"),
        (["--config=configs/base.py"], "--workdir is required"),
        (["--config=configs/nope.py", "--workdir=WORK"],
         "--config=configs/nope.py: no such config file"),
        (["--config=configs/base.py", "--workdir=FILE"], "is a file, not a directory"),
        (["--config=configs/base.py", "--workdir=FILE/run"],
         "a part of the path is a file, not a directory"),
    ],
    ids=["not_an_int", "no_workdir", "no_config_file", "workdir_is_a_file", "parent_is_a_file"],
)  # fmt: skip
def test_bad_flags_are_one_line(tmp_path, argv, expected):
    (tmp_path / "file").write_text("not a directory")
    argv = [a.replace("WORK", str(tmp_path / "w")).replace("FILE", str(tmp_path / "file"))
            for a in argv]  # fmt: skip
    assert_one_line_error(run("main.py", *argv), expected)


@pytest.mark.e2e
def test_resume_after_a_model_change_keeps_the_checkpoints_and_names_the_change(tmp_path):
    model = tmp_path / "model"
    shutil.copytree(ASSETS / "demo_model", model)
    workdir = tmp_path / "run"
    first = train(workdir, "--config.train.steps=2", "--config.checkpoint.every_steps=1",
                  f"--config.model.name_or_path={model}")  # fmt: skip
    assert first.returncode == 0, first.stderr[-3000:]
    before = sorted(p.relative_to(workdir) for p in workdir.rglob("*") if "checkpoints" in p.parts)
    config = json.loads((model / "config.json").read_text())
    config["num_hidden_layers"] = 1
    (model / "config.json").write_text(json.dumps(config))
    again = train(workdir, "--config.train.steps=4", f"--config.model.name_or_path={model}")
    assert_one_line_error(again, "holds checkpoints of another run", "They are kept",
                          "model num_hidden_layers: 2 -> 1", "new --workdir")  # fmt: skip
    after = sorted(p.relative_to(workdir) for p in workdir.rglob("*") if "checkpoints" in p.parts)
    assert after == before and saved_steps(workdir) == [1, 2]
    assert not (workdir / "checkpoints_damaged").exists()


@pytest.mark.e2e
def test_chat_on_a_model_folder_without_a_tokenizer(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(ASSETS / "demo_model" / name, model)
    result = run("-m", "sft_jax.chat", f"--model={model}", "--prompt=hi")
    assert_one_line_error(result, f"{model}: no tokenizer could be loaded")


@pytest.mark.e2e
def test_inspect_with_a_model_path_that_does_not_exist(tmp_path):
    result = run("-m", "sft_jax.data.inspect", "--config=configs/base.py",
                 f"--config.model.name_or_path={tmp_path / 'nope'}")  # fmt: skip
    assert_one_line_error(result, f"{tmp_path / 'nope'}: not a model directory")


@pytest.mark.e2e
def test_export_of_a_damaged_step_names_it(straight, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(straight, copy)
    for data_file in (copy / "checkpoints" / "4" / "state").rglob("d/*"):
        data_file.write_bytes(b"garbage")
    result = run("-m", "sft_jax.export", f"--workdir={copy}", "--step=4")
    assert_one_line_error(result, "the checkpoint of step 4 cannot be read", "--step=N", "[2]")
    assert run("-m", "sft_jax.export", f"--workdir={copy}", "--step=2").returncode == 0


# --- Faults ----------------------------------------------------------------------------------


@pytest.mark.e2e
def test_a_save_past_the_file_size_limit_keeps_the_previous_checkpoint(straight, tmp_path):
    workdir = tmp_path / "run"
    common = ("--config.checkpoint.every_steps=2",)
    assert train(workdir, "--config.train.steps=2", *common).returncode == 0
    # One of the state files is 3.4 MB: a 1 MB limit stops the save of step 4.
    limited = train(workdir, "--config.train.steps=4", *common, shell_prefix="ulimit -f 1000")
    assert_one_line_error(limited, "saving the checkpoint of step 4", "file-size limit",
                          "The last complete checkpoint (step 2) is intact")  # fmt: skip
    assert "Future exception was never retrieved" not in limited.stderr  # reported once
    assert saved_steps(workdir) == [2]
    resumed = train(workdir, "--config.train.steps=4", *common)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "at step 2" in resumed.stderr
    assert train_losses(workdir) == train_losses(straight)  # bitwise


@pytest.mark.e2e
def test_a_second_run_on_the_same_workdir_is_refused_and_kill_9_frees_it(tmp_path):
    workdir = tmp_path / "run"
    first = subprocess.Popen(
        command("main.py", "--config=configs/base.py", *FAST, "--config.train.steps=100000",
                workdir=workdir),
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        lock = workdir / ".sft_jax.lock"
        deadline = time.time() + 120
        while not (lock.exists() and lock.read_text().startswith("pid")):
            assert time.time() < deadline and first.poll() is None, "the first run never started"
            time.sleep(0.05)
        second = train(workdir, "--config.train.steps=1")
        assert_one_line_error(second, "another run is using it", f"pid {first.pid}")
    finally:
        first.kill()  # SIGKILL: no cleanup runs
        first.wait()
    third = train(workdir, "--config.train.steps=1")
    assert "another run" not in third.stderr
    assert third.returncode == 0, third.stderr[-3000:]


@pytest.mark.e2e
def test_a_corrupt_tokenization_cache_entry_is_rebuilt(tmp_path):
    cache = tmp_path / "cache"
    inspect = ("-m", "sft_jax.data.inspect", "--config=configs/base.py", "--json",
               f"--config.data.cache_dir={cache}")  # fmt: skip
    first = run(*inspect)
    assert first.returncode == 0, first.stderr[-2000:]
    entries = list(cache.glob("*.npz"))
    assert entries
    for entry in entries:
        entry.write_bytes(b"not a numpy archive")
    second = run(*inspect)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "is unreadable" in second.stderr and "tokenizing again" in second.stderr
    assert json.loads(second.stdout) == json.loads(first.stdout)


@pytest.mark.e2e
def test_sigterm_during_the_first_eval_leaves_a_usable_checkpoint(tmp_path):
    workdir = tmp_path / "run"
    slow_eval = ("--config.eval.at_start=True", "--config.eval.generate_examples=64",
                 "--config.data.eval_max_examples=64")  # fmt: skip
    process = subprocess.Popen(
        command("main.py", "--config=configs/base.py", *FAST, *slow_eval,
                "--config.train.steps=50", workdir=workdir),
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    lines = []
    for line in process.stderr:
        lines.append(line)
        if "step 0: evaluating" in line:  # (its greedy replies take seconds on CPU)
            process.send_signal(signal.SIGTERM)
            break
    rest = process.stderr.read()
    process.wait(timeout=240)
    output = "".join(lines) + rest
    assert process.returncode == 0, output[-3000:]
    assert "Traceback" not in output
    assert "stopped by signal at step 0; checkpoint saved" in output
    assert saved_steps(workdir) == [0]
    resumed = train(workdir, *slow_eval, "--config.train.steps=1")
    assert resumed.returncode == 0 and "at step 0" in resumed.stderr, resumed.stderr[-3000:]


@pytest.mark.e2e
def test_a_signal_during_export_leaves_the_checkpoints_and_no_half_export(straight, tmp_path):
    from sft_jax.loop import export
    from sft_jax.loop.signals import SignalStopError, signals_raise

    copy = tmp_path / "run"
    shutil.copytree(straight, copy)
    (copy / "export").mkdir()
    (copy / "export" / "old.txt").write_text("the previous export")

    def stopped_mid_write(model, out, **kwargs):
        (Path(out) / "model.safetensors").parent.mkdir(parents=True, exist_ok=True)
        (Path(out) / "model.safetensors").write_bytes(b"half")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(export, "save_pretrained", stopped_mid_write)
        stop = pytest.raises(SignalStopError, match="SIGTERM: the export stopped")
        with stop, signals_raise("the export stopped"):
            export.export_run(copy, which="last")
    assert (copy / "export" / "old.txt").read_text() == "the previous export"
    assert saved_steps(copy) == [2, 4]
    assert export.export_run(copy, which="last") == copy / "export"
    assert (copy / "export" / "model.safetensors").stat().st_size > 1000


@pytest.mark.e2e
def test_a_non_finite_loss_stops_naming_the_step_and_keeps_the_last_finite_checkpoint(tmp_path):
    workdir = tmp_path / "run"
    result = train(workdir, "--config.train.steps=30", "--config.checkpoint.every_steps=1",
                   "--config.train.learning_rate=1e6", "--config.train.warmup_steps=0",
                   "--config.train.max_grad_norm=0")  # fmt: skip
    line = assert_one_line_error(result, "stopping before anything more is saved")
    step = int(line.split("step ", 1)[1].split(":", 1)[0])
    assert saved_steps(workdir)[-1] == step - 1
    assert f"The last complete checkpoint (step {step - 1}) is intact" in line
