"""Orbax checkpoints of a run: train state, data position and config; async, last K plus best."""

from __future__ import annotations

import functools
import json
import logging
import shutil
import signal
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as policies

from sft_jax.errors import ConfigError

log = logging.getLogger(__name__)
BEST_METRIC = "eval/loss"


class _ExpectedOrbaxWarnings(logging.Filter):
    """Orbax warns about what we ask for on purpose: saves between evals carry no eval loss,
    and another run's checkpoints are opened read only."""

    EXPECTED = ("did not provide metrics", "Given directory is read only")

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(text in record.getMessage() for text in self.EXPECTED)


logging.getLogger("absl").addFilter(_ExpectedOrbaxWarnings())


class Checkpoints:
    """WORKDIR/checkpoints/<step>/{state, data, meta}: written in the background, atomically.

    `state` is the train-state pytree (params, optimizer state, step), `data` the data
    iterator's JSON state, `meta` the config of the run and the metrics at that step.
    """

    def __init__(
        self,
        directory: Path,
        keep_last: int = 1,
        keep_best: int = 1,
        async_save: bool = True,
        read_only: bool = False,
    ):
        self.directory = Path(directory).absolute()
        preserve = [policies.LatestN(n=max(keep_last, 1))]
        if keep_best > 0:
            preserve.append(
                policies.BestN(
                    get_metric_fn=lambda metrics: metrics[BEST_METRIC],
                    reverse=True,  # lower eval loss is better
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
            best_fn=lambda metrics: metrics[BEST_METRIC],
            best_mode="min",
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data", "meta")
        )

    def save(
        self,
        step: int,
        state: Any,
        data_state: dict[str, Any],
        config: ml_collections.ConfigDict,
        metrics: dict[str, float] | None = None,
        trainer_state: dict[str, Any] | None = None,
    ) -> None:
        """Starts saving; returns once the device arrays are copied (training may go on)."""
        meta = {"config": config.to_json(), "metrics": metrics or {},
                "trainer": trainer_state or {}}  # fmt: skip
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeSave(state),
                data=ocp.args.JsonSave(data_state),
                meta=ocp.args.JsonSave(meta),
            ),
            metrics={BEST_METRIC: metrics[BEST_METRIC]}
            if metrics and BEST_METRIC in metrics
            else None,
            force=True,
        )

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def steps(self) -> list[int]:
        self.manager.reload()
        return sorted(self.manager.all_steps())

    def meta(self, step: int) -> dict[str, Any]:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def best_step(self) -> int | None:
        """The kept step with the lowest eval loss, or None when no eval was saved."""
        scored = [
            (m[BEST_METRIC], s)
            for s in self.steps()
            if BEST_METRIC in (m := self.meta(s)["metrics"])
        ]
        return min(scored)[1] if scored else None

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any], dict[str, Any]]:
        """State (resharded onto `abstract_state`'s shardings), data state and meta of a step."""
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
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=_tree_restore(target, partial=True))
        )
        return restored.state["params"]

    def restore_latest(
        self, abstract_state: Any, config: ml_collections.ConfigDict | None = None
    ) -> tuple[int, Any, dict[str, Any], dict[str, Any]] | None:
        """(step, state, data state, meta) of the newest checkpoint that restores.

        A damaged one is moved aside to checkpoints_damaged/ with a warning (so that the step
        can be saved again) and the one before is tried. A checkpoint of another config (see
        RESUME_FIELDS) is an error, not damage: resuming it would silently mean another run.
        """
        for step in reversed(self.steps()):
            try:
                meta = self.meta(step)
                if config is not None and (changes := config_changes(meta["config"], config)):
                    raise ConfigError(
                        f"{self.directory} holds checkpoints of a run with another config ("
                        f"{'; '.join(changes)}). Resume with the config it was saved with, or "
                        "start in a new --workdir (these checkpoints are kept)."
                    )
                state, data_state, _ = self.restore(step, abstract_state)
            except ConfigError:
                raise
            except Exception as e:  # a damaged checkpoint must not end the run: use an older one
                log.warning(
                    "checkpoint %d in %s cannot be restored (%s: %s); moving it to %s and trying "
                    "the one before.", step, self.directory, type(e).__name__, str(e)[:300],
                    self.damaged_dir,
                )  # fmt: skip
                self._move_aside(step)
                continue
            return step, state, data_state, meta
        return None

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
        self.manager.wait_until_finished()
        self.manager.close()


# What a resumed run must share with the run that saved: the saved state's structure (model,
# dtypes, adapters, quantization, clipping) and the meaning of the data position (data, row
# length, batch, seed). Steps, learning rate, eval and logging may change between restarts.
ADAPTER_FIELDS = (
    "lora.rank", "lora.target_modules", "lora.trainable_modules", "lora.quantize",
    "lora.quant_block_size", "lora.double_quant",
)  # fmt: skip
RESUME_FIELDS = (
    "model.name_or_path", "model.param_dtype", *ADAPTER_FIELDS,
    "data.train_files", "data.train_split", "data.format", "data.chat_template", "data.train_on",
    "data.max_length", "data.packing", "data.max_documents_per_row", "data.shuffle",
    "train.global_batch_size", "train.seed",
)  # fmt: skip


def config_changes(
    saved_json: str, config: ml_collections.ConfigDict, fields: tuple[str, ...] = RESUME_FIELDS
) -> list[str]:
    """'field: saved -> now' for each of `fields` that differs (for RESUME_FIELDS, also
    clipping turned on or off, which changes the optimizer state)."""
    saved = json.loads(saved_json)

    def lookup(tree: Any, dotted: str) -> Any:
        for part in dotted.split("."):
            tree = tree.get(part) if isinstance(tree, Mapping) else None
        return tree

    now = config.to_dict()
    changes = [
        f"{field}: {lookup(saved, field)!r} -> {lookup(now, field)!r}"
        for field in fields
        if lookup(saved, field) != lookup(now, field)
    ]
    clipped = [(lookup(tree, "train.max_grad_norm") or 0) > 0 for tree in (saved, now)]
    if fields is RESUME_FIELDS and clipped[0] != clipped[1]:  # clipping adds optimizer state
        changes.append(f"train.max_grad_norm > 0: {clipped[0]} -> {clipped[1]}")
    return changes


def _tree_restore(abstract: Any, partial: bool = False) -> ocp.args.PyTreeRestore:
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract)
    return ocp.args.PyTreeRestore(abstract, restore_args=restore_args, partial_restore=partial)


class StopSignal:
    """Turns SIGTERM / SIGINT into a request to save and stop after the current step."""

    def __init__(self):
        self.requested = False
        self._previous = {}
        self._vote = None  # with several processes: the last vote, still on the devices

    def __enter__(self) -> StopSignal:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: object) -> None:
        log.warning(
            "received %s: saving after this step (with several processes, the next), then "
            "stopping.",
            signal.Signals(signum).name,
        )
        self.requested = True

    def agreed(self) -> bool:
        """True when any process was signalled; every process answers alike at the same call.

        With several processes the flags are combined on the devices and each call answers the
        previous call's vote, which has finished by then (it ran before the last step), so the
        host never waits for the step it just dispatched: a signal stops one step later.
        """
        if jax.process_count() == 1:
            return self.requested
        previous, self._vote = self._vote, _any_process(self.requested)
        return previous is not None and bool(np.asarray(previous.addressable_data(0)))


@functools.cache
def _vote_program() -> tuple[jax.sharding.NamedSharding, Any]:
    """(sharding of one flag per device, jitted 'any' replicated on every device)."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("devices",))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    per_device = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("devices"))
    return per_device, jax.jit(jnp.any, out_shardings=replicated)


def _any_process(flag: bool) -> jax.Array:
    """Whether any process's flag is set, as a device array every process can read (async)."""
    per_device, any_of = _vote_program()
    flags = np.full((jax.local_device_count(),), flag)
    return any_of(jax.make_array_from_process_local_data(per_device, flags, (jax.device_count(),)))
