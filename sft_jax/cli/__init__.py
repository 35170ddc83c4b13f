"""The error boundary every command shares: an expected error is one line naming what is wrong
and what to do, and a non-zero exit; `--debug` (or SFT_JAX_DEBUG=1) shows the traceback.
Unexpected exceptions always show theirs."""

from __future__ import annotations

import errno
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn, TypeVar

from absl import flags
from absl import logging as absl_logging

from sft_jax.core.errors import TrainingDivergedError, UserError

# transformers gives us tokenizers, configs and chat templates only: its advice that PyTorch is
# missing ("Models won't be available") is noise to a user of ours (set before it is imported).
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

Result = TypeVar("Result")

# Errors that come from the user's input, files or machine, not from a bug in sft_jax.
EXPECTED = (UserError, TrainingDivergedError, OSError, flags.Error)

_OS_ADVICE = {
    errno.ENOSPC: "the disk is full: free space or point --workdir at a larger disk",
    errno.EDQUOT: "the disk quota is used up: free space or point --workdir elsewhere",
    errno.EFBIG: "a file-size limit (ulimit -f) stopped the write: raise it",
    errno.EACCES: "permission denied: choose a path you can write, or fix its permissions",
    errno.EPERM: "not permitted: choose a path you can write, or fix its permissions",
    errno.EROFS: "the file system is read-only: choose a writable path",
    errno.ENOTDIR: "a part of the path is a file, not a directory: choose another path",
    errno.EISDIR: "a directory stands where a file was expected",
    errno.ENOENT: "no such file or directory: check the path",
}


def define_debug_flag() -> None:
    """--debug: show the traceback of expected errors too (for bug reports)."""
    flags.DEFINE_bool("debug", False, "Show tracebacks of expected errors (config, data, I/O).")


def debugging() -> bool:
    env = os.environ.get("SFT_JAX_DEBUG", "") not in ("", "0")
    return env or bool(getattr(flags.FLAGS, "debug", False) if flags.FLAGS.is_parsed() else False)


def describe(error: BaseException) -> str:
    """One line for an expected error."""
    if isinstance(error, OSError) and error.errno in _OS_ADVICE:
        where = f"{error.filename}: " if error.filename else ""
        return f"{where}{_OS_ADVICE[error.errno]} ({error.strerror})."
    text = str(error).strip() or type(error).__name__
    if isinstance(error, OSError):
        return f"{type(error).__name__}: {text}"
    return text


def fail(message: str) -> NoReturn:
    sys.exit(f"error: {message}")


def run_command(
    body: Callable[[], Result], saved_note: Callable[[BaseException], str] | None = None
) -> Result:
    """body(), with expected errors turned into one line and exit status 1. saved_note(error),
    where given, says what is still on disk (e.g. the last complete checkpoint)."""
    quiet_logs()
    # A write past `ulimit -f` then fails with EFBIG instead of killing the process unnoticed.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    previous_hook = sys.unraisablehook
    if not debugging():
        sys.unraisablehook = _quiet_unraisable
    try:
        result = body()
    except EXPECTED as e:
        if debugging():
            raise
        note = saved_note(e) if saved_note is not None else ""
        # Background writes that failed with it (a save past a disk or file-size limit) are
        # logged again by asyncio at exit, each with its own copy of the same error: the
        # failure is reported once, here.
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)
        fail(describe(e) + (f" {note}" if note else ""))
    sys.unraisablehook = previous_hook
    return result


def quiet_logs() -> None:
    """The terminal gets our messages at INFO and the libraries' from WARNING (Orbax logs every
    save and restore, jax its search for backends); their INFO still reaches a run's log file
    (workdir/rundir.run_log). absl's --verbosity=0 (or higher) brings theirs back."""
    asked = "verbosity" in flags.FLAGS and flags.FLAGS["verbosity"].present
    logging.getLogger("sft_jax").setLevel(logging.INFO)
    if asked:
        return
    absl_logging.set_verbosity(absl_logging.INFO)
    terminal = absl_logging.get_absl_handler()
    if _ours_or_warnings not in terminal.filters:
        terminal.addFilter(_ours_or_warnings)


def _ours_or_warnings(record: logging.LogRecord) -> bool:
    return record.name.startswith("sft_jax") or record.levelno >= logging.WARNING


def _quiet_unraisable(unraisable: sys.UnraisableHookArgs) -> None:
    """After a failed background write, Orbax's TensorStore callbacks find their event loop
    closed, hundreds of times over: noise, not news (the failure itself is reported once).
    Anything else is shown as usual."""
    error = unraisable.exc_value
    if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
        return
    sys.__unraisablehook__(unraisable)


def parse_flags(argv: Sequence[str], config_hint: Callable[[list[str]], str | None]) -> list[str]:
    """absl's parsing, with flag and config-file problems as one line instead of a traceback.
    config_hint(argv) names a mistyped --config.* field (or returns None)."""
    argv = list(argv)
    for arg in argv:
        if arg.startswith("--config=") and not Path(arg.split("=", 1)[1].split(":")[0]).is_file():
            fail(f"{arg}: no such config file; give one such as --config=configs/base.py.")
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError) as e:
        fail(config_hint(argv) or str(e))
    except flags.Error as e:
        fail(_flag_message(str(e)))


def _flag_message(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    for index, line in enumerate(lines):
        if "must have a value other than None" in line:
            name = line.split("--", 1)[1].split("=", 1)[0]
            lines[index] = f"--{name} is required ({_REQUIRED.get(name, 'see --help')})."
    return " ".join(lines)


_REQUIRED = {
    "workdir": "the directory for checkpoints, metrics and the export, e.g. --workdir=/tmp/run",
    "config": "a config file, e.g. --config=configs/base.py",
}


def writable_directory(path: str | Path, flag: str = "--workdir") -> Path:
    """The directory `path`, created if missing; a clear error where it cannot be one."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        fail(f"{flag}={path}: is a file, not a directory; choose a directory.")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        fail(f"{flag}={path}: cannot create it ({describe(e)})")
    if not os.access(path, os.W_OK | os.X_OK):
        fail(f"{flag}={path}: not writable; choose a directory you can write.")
    return path
