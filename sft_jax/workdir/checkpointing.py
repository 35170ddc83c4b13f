"""Orbax checkpoints of a run: train state, data position and config; async, last K plus best."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import shutil
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as policies
from orbax.checkpoint._src import asyncio_utils

from sft_jax.core.errors import ConfigError, UserError
from sft_jax.core.spec import RunSpec
from sft_jax.workdir.compatibility import config_changes, shape_changes

log = logging.getLogger(__name__)
# What "best" means: the first of these eval metrics a run writes, times its sign, lowest
# (SFT, preference and reward models: the eval loss; online RL: the mean reward, highest).
SELECTION = (("eval/loss", 1.0), ("eval/reward", -1.0))


def selection_score(metrics: dict[str, Any] | None) -> float | None:
    """The lower-is-better score of an eval's metrics (SELECTION); None without one."""
    for key, sign in SELECTION:
        if metrics and key in metrics:
            return sign * float(metrics[key])
    return None


class _OrbaxLogFilter(logging.Filter):
    """Orbax warns about what we ask for on purpose: saves between evals carry no eval loss,
    and another run's checkpoints are opened read only. A failed background save it logs with
    a traceback from its thread; Checkpoints reports the failure itself, in one line."""

    EXPECTED = (
        "did not provide metrics",
        "Given directory is read only",
        "Metadata file does not exist",
    )

    def filter(self, record: logging.LogRecord) -> bool:
        if "orbax" in record.pathname and record.levelno >= logging.ERROR:
            record.exc_info, record.exc_text = None, None
            record.msg, record.args = str(record.getMessage()).splitlines()[0][:300], ()
        return not any(text in record.getMessage() for text in self.EXPECTED)


logging.getLogger("absl").addFilter(_OrbaxLogFilter())


_SETTLE_S = 120.0  # how long a failed restore waits for its other reads


def _run_until_settled(coro: Coroutine[Any, Any, Any]) -> Any:
    """Orbax's asyncio_utils._run_sync_via_new_loop, except that a failure first waits for the
    operations still in flight. Orbax closes its loop as soon as one array of a restore fails;
    the reads of the others were left pending on the closed loop, and TensorStore completing
    them (RuntimeError: Event loop is closed) or the garbage collector finalizing them
    ("Exception ignored in: <coroutine object _read_array_index_and_device_put ...>", the
    TensorStore spec of each) printed tracebacks after the one clear message."""
    loop = asyncio.new_event_loop()
    try:
        asyncio.set_event_loop(loop)
        try:
            return loop.run_until_complete(coro)
        except Exception:
            # A pending read may start others (an array's shards): until none is left. What is
            # still pending after _SETTLE_S (a read that hangs) is cancelled instead.
            deadline = time.monotonic() + _SETTLE_S
            while pending := asyncio.all_tasks(loop):
                settled = asyncio.gather(*pending, return_exceptions=True)
                try:
                    wait = asyncio.wait_for(settled, max(deadline - time.monotonic(), 0.0))
                    loop.run_until_complete(wait)
                except asyncio.TimeoutError:
                    break
            raise
    finally:
        asyncio.set_event_loop(None)
        loop.close()


@contextlib.contextmanager
def _settled_reads() -> Iterator[None]:
    """Restores through _run_until_settled (Orbax 0.12.8 runs each one through
    asyncio_utils._run_sync_via_new_loop; another version without it is left as it is)."""
    original = getattr(asyncio_utils, "_run_sync_via_new_loop", None)
    if original is None:
        yield
        return
    asyncio_utils._run_sync_via_new_loop = _run_until_settled
    try:
        yield
    finally:
        asyncio_utils._run_sync_via_new_loop = original


class CheckpointSaveError(UserError):
    """A checkpoint could not be written; the ones saved before it are intact."""


# Errors a failed write reports (Orbax passes TensorStore's os_error_code on): what to do.
_WRITE_FAILURES = {
    "27": "a file-size limit (ulimit -f) stopped the write: raise it",
    "28": "the disk is full: free space or move --workdir to a larger disk",
    "122": "the disk quota is used up: free space or move --workdir",
    "13": "permission denied: make the directory writable",
}


# Orbax 0.12.8 (the newest release) hands array data to TensorStore with its GCS driver for gs://
# and its local file driver for every other path (orbax/checkpoint/_src/serialization/
# tensorstore_utils.py: _use_gcs_driver l.213, _normalize_path l.222, the file-driver specs of
# l.366 and l.471), while JSON metadata goes through etils.epath (s3fs). An s3:// directory is
# refused with OCDBT (l.356, "should be absolute": 's3://' normalised to 's3:/') and without it
# the arrays silently land in a local './s3:/bucket/...' folder. So Checkpoints always writes to
# a local directory; a bucket WORKDIR is staged locally and mirrored
# (sft_jax.workdir.bucket_mirror).
def require_local(path: str | Path, field: str) -> None:
    """A ConfigError naming `field` where `path` is a bucket URL (s3://, gs://, ...) given
    where only a local directory works: pathlib would turn 's3://b/run' into 's3:/b/run'."""
    if "://" in str(path):
        raise ConfigError(
            f"{field}={path}: must be a local or mounted directory, not a bucket URL (Orbax "
            f"{ocp.__version__} cannot write checkpoint arrays to S3). A bucket --workdir is "
            "staged in a local directory and uploaded; see README 'Data at scale'."
        )


def committed_steps(directory: Path) -> list[int]:
    """Steps whose checkpoint is committed (Orbax renames a finished save to its bare step
    number), read from the directory alone: safe to call after any failure."""
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir())


class Checkpoints:
    """WORKDIR/checkpoints/<step>/{state, data, meta}: written in the background, atomically.

    `state` is the train-state pytree (params, optimizer state, step), `data` the data
    iterator's JSON state, `meta` the config of the run and the metrics at that step.
    `on_saved(step_dir, kept_steps)`, where given, runs in a background thread (process 0) once
    Orbax has finalized a step -- a bucket WORKDIR's upload -- and is waited on before the next
    save (which may delete older local steps) and on close; its failure is a CheckpointSaveError.
    """

    def __init__(
        self,
        directory: Path,
        keep_last: int = 1,
        keep_best: int = 1,
        async_save: bool = True,
        read_only: bool = False,
        on_saved: Callable[[Path, list[int]], None] | None = None,
    ):
        require_local(directory, "checkpoint directory")
        self.directory = Path(directory).absolute()
        preserve = [policies.LatestN(n=max(keep_last, 1))]
        if keep_best > 0:
            preserve.append(
                policies.BestN(
                    get_metric_fn=selection_score,
                    reverse=True,  # a lower score is better
                    n=keep_best,
                    keep_checkpoints_without_metrics=False,
                )
            )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policies.AnyPreservationPolicy(preserve),
            enable_async_checkpointing=async_save,
            create=not read_only,
            read_only=read_only,  # another run's checkpoints: never written, never pruned
            save_interval_steps=0 if read_only else 1,
            # Without best_fn Orbax never writes a step's metrics to disk, so after a restart
            # BestN sees none and deletes the best checkpoint: keep them on disk.
            best_fn=selection_score,
            best_mode="min",
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data", "meta")
        )
        self._saving: int | None = None  # the step of the save in flight
        self._on_saved = on_saved
        self._publishing: threading.Thread | None = None
        self._publish_error: tuple[int, Exception] | None = None

    def save(
        self,
        step: int,
        state: Any,
        data_state: dict[str, Any],
        config: RunSpec,
        metrics: dict[str, float] | None = None,
        trainer_state: dict[str, Any] | None = None,
    ) -> None:
        """Starts saving; returns once the device arrays are copied (training may go on)."""
        meta = {
            "config": config.to_json(),
            "metrics": metrics or {},
            "trainer": trainer_state or {},
        }
        self.wait()  # the previous save's failure is reported as its own, not as this one's
        self._saving = step
        try:
            self._start_save(step, state, data_state, meta, metrics)
        except Exception as e:
            raise self._save_failed(e) from e
        if self._on_saved is not None and jax.process_index() == 0:
            self._publishing = threading.Thread(target=self._publish, args=(step,), daemon=True)
            self._publishing.start()

    def _publish(self, step: int) -> None:
        """In the background: once the step is finalized, hands it to on_saved."""
        try:
            self.manager.wait_until_finished()
        except Exception:
            return  # the save itself failed: wait() reports that
        try:
            self._on_saved(self.directory / str(step), committed_steps(self.directory))
        except Exception as e:  # reported by wait(), in the main thread
            self._publish_error = step, e

    def _start_save(self, step: int, state: Any, data_state: Any, meta: dict, metrics) -> None:
        scored = {key: float(metrics[key]) for key, _ in SELECTION if metrics and key in metrics}
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeSave(state),
                data=ocp.args.JsonSave(data_state),
                meta=ocp.args.JsonSave(meta),
            ),
            metrics=scored or None,
            force=True,
        )

    def wait(self) -> None:
        """Until the background save is written and handed to on_saved; a failure of either
        raises CheckpointSaveError."""
        if self._publishing is not None:
            self._publishing.join()
            self._publishing = None
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            raise self._save_failed(e) from e
        if self._publish_error is not None:
            (step, error), self._publish_error = self._publish_error, None
            raise self._publish_failed(step, error) from error

    def _publish_failed(self, step: int, error: Exception) -> CheckpointSaveError:
        return CheckpointSaveError(
            f"step {step} was saved to {self.directory / str(step)} but could not be uploaded ("
            f"{str(error).splitlines()[0][:400]}). It is kept there, complete, and the steps "
            "uploaded before it are intact: run the same command again to upload it and resume."
        )

    def _save_failed(self, error: Exception) -> CheckpointSaveError:
        text = str(error).splitlines()[0] if str(error) else type(error).__name__
        code = re.search(r"os_error_code='?(\d+)", text)
        errno_ = str(getattr(error, "errno", "") or (code.group(1) if code else ""))
        why = _WRITE_FAILURES.get(errno_, f"{type(error).__name__}: {text[-300:]}")
        return CheckpointSaveError(
            f"saving the checkpoint of step {self._saving} in {self.directory} failed ({why}); "
            "the checkpoints saved before it are intact."
        )

    def steps(self) -> list[int]:
        self.manager.reload()
        return sorted(self.manager.all_steps())

    def meta(self, step: int) -> dict[str, Any]:
        with _settled_reads():
            restored = self.manager.restore(
                step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
            )
        return restored.meta

    def best_step(self) -> int | None:
        """The kept step with the best eval (SELECTION), or None when no eval was saved."""
        scored = [
            (score, s)
            for s in self.steps()
            if (score := selection_score(self.meta(s)["metrics"])) is not None
        ]
        return min(scored)[1] if scored else None

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any], dict[str, Any]]:
        """State (resharded onto `abstract_state`'s shardings), data state and meta of a step."""
        with _settled_reads():
            restored = self.manager.restore(
                step,
                args=ocp.args.Composite(
                    state=_tree_restore(abstract_state),
                    data=ocp.args.JsonRestore(),
                    meta=ocp.args.JsonRestore(),
                ),
            )
        return restored.state, restored.data, restored.meta

    def restore_params(self, step: int, abstract_params: Any) -> Any:
        """Only the parameters of a step (no optimizer state is read)."""
        target = {"params": abstract_params}
        with _settled_reads():
            restored = self.manager.restore(
                step, args=ocp.args.Composite(state=_tree_restore(target, partial=True))
            )
        return restored.state["params"]

    def restore_latest(
        self,
        abstract_state: Any,
        config: RunSpec | None = None,
        model: dict[str, Any] | None = None,
    ) -> tuple[int, Any, dict[str, Any], dict[str, Any]] | None:
        """(step, state, data state, meta) of the newest checkpoint that restores.

        A damaged one (unreadable) is moved aside to checkpoints_damaged/ with a warning (so
        that the step can be saved again) and the one before is tried. A checkpoint of another
        run -- another config (see RESUME_FIELDS), another model shape (`model`, as
        model_summary gives it) or state of other shapes -- is an error that names what
        differs and keeps every checkpoint where it is: resuming it would silently mean
        another run.
        """
        for step in reversed(self.steps()):
            try:
                meta = self.meta(step)
            except Exception as e:  # a damaged checkpoint must not end the run: use an older one
                self._set_aside(step, e)
                continue
            differences = self._differences(step, meta, abstract_state, config, model)
            if differences:
                raise ConfigError(
                    f"{self.directory} holds checkpoints of another run ({'; '.join(differences)})."
                    " They are kept as they are. Resume with the config and model they were "
                    "saved with, or start in a new --workdir (config.checkpoint.init_from=WORKDIR "
                    "starts from their parameters where the model's shape is the same)."
                )
            try:
                state, data_state, _ = self.restore(step, abstract_state)
            except Exception as e:
                self._set_aside(step, e)
                continue
            return step, state, data_state, meta
        return None

    def _differences(
        self,
        step: int,
        meta: dict[str, Any],
        abstract_state: Any,
        config: RunSpec | None,
        model: dict[str, Any] | None,
    ) -> list[str]:
        """What makes a step another run's: config fields, model fields, state shapes."""
        changes = config_changes(meta["config"], config) if config is not None else []
        saved_model = meta.get("trainer", {}).get("model")
        if model is not None and saved_model:
            changes += [
                f"model {field}: {saved_model.get(field)!r} -> {model.get(field)!r}"
                for field in sorted(set(model) | set(saved_model))
                if saved_model.get(field) != model.get(field)
            ]
        return changes + shape_changes(self.directory / str(step) / "state", abstract_state)

    def _set_aside(self, step: int, error: Exception) -> None:
        # Orbax wraps a failed read in "Encountered error while reading array index ..." and
        # the TensorStore spec, over many lines; what failed is in the error it was raised from.
        while error.__cause__ is not None:
            error = error.__cause__
        log.warning(
            "checkpoint %d in %s cannot be restored (%s: %s); moving it to %s and trying "
            "the one before.",
            step,
            self.directory,
            type(error).__name__,
            (str(error).splitlines() or [""])[0][:300],
            self.damaged_dir,
        )
        self._move_aside(step)

    @property
    def damaged_dir(self) -> Path:
        return self.directory.parent / f"{self.directory.name}_damaged"

    def _move_aside(self, step: int) -> None:
        """Keeps a damaged step's files, out of the manager's sight (process 0 moves them)."""
        if jax.process_index() == 0:
            source = self.directory / str(step)
            if source.exists():
                self.damaged_dir.mkdir(parents=True, exist_ok=True)
                target = self.damaged_dir / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
                shutil.move(str(source), str(target))
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"sft_jax: moved checkpoint {step} aside")
        self.manager.reload()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.manager.close()


def _tree_restore(abstract: Any, partial: bool = False) -> ocp.args.PyTreeRestore:
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract)
    return ocp.args.PyTreeRestore(abstract, restore_args=restore_args, partial_restore=partial)
