"""The training loop: data in, compiled steps (sft_jax.train.compiled), eval, checkpoints, metrics.

`run(config, workdir, data_factory)` is everything main.py does after parsing flags.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from sft_jax.adapters import methods as adapter_methods
from sft_jax.core.errors import ConfigError, TrainingDivergedError
from sft_jax.core.spec import RunSpec
from sft_jax.data import DataSource
from sft_jax.data.cloud import is_remote
from sft_jax.evaluation.tasks import harness_metrics
from sft_jax.generation.sampler import chat_stop_token_ids
from sft_jax.generation.samples import generation_metrics
from sft_jax.loop.batch_source import BatchSource, FileBatches
from sft_jax.loop.export import export_run
from sft_jax.loop.rollouts import GRPOBatches
from sft_jax.loop.signals import StopSignal, signals_raise
from sft_jax.models import CausalLM
from sft_jax.models.layers import TRAINABLE
from sft_jax.objectives import registry
from sft_jax.planning import search as plan_search
from sft_jax.train import compiled as compile_plan
from sft_jax.train import distributed, sharding
from sft_jax.train.config_check import check_mesh, check_tokenizer_fits, check_values
from sft_jax.train.evaluation import EarlyStopping, eval_message, evaluate, final_report
from sft_jax.train.flops import peak_flops_per_device
from sft_jax.train.setup import build_model, with_loader
from sft_jax.train.sharding import abstract_like
from sft_jax.train.vision_flops import step_flops_per_token
from sft_jax.workdir import bucket_mirror, rundir
from sft_jax.workdir.bucket_mirror import BucketMirror
from sft_jax.workdir.checkpointing import Checkpoints, selection_score
from sft_jax.workdir.compatibility import ADAPTER_FIELDS, config_changes, model_summary
from sft_jax.workdir.metrics import MetricsWriter, Progress
from sft_jax.workdir.trackers import setup_figures

log = logging.getLogger(__name__)

# Sources of train rows that objectives make themselves, by what they read (objectives/
# registry.py); any other objective's rows come from the data files (FileBatches).
PRODUCERS = {"prompts": GRPOBatches}

__all__ = ["DataSource", "StopSignal", "Trainer", "TrainingDivergedError", "run"]


class Trainer:
    """Runs one run's loop over the steps its compile plan made: train, eval, save, stop."""

    def __init__(
        self,
        config: RunSpec,
        workdir: Path,
        model: CausalLM,
        data: DataSource,
        trainable: Any = TRAINABLE,
        mesh: Mesh | None = None,
        mirror: BucketMirror | None = None,
        batch_source: Callable[[compile_plan.Steps], BatchSource] | None = None,
    ):
        """`workdir` is local: a bucket WORKDIR's staging copy, whose steps `mirror` uploads.
        batch_source(steps) gives the train batches (default: `data`'s rows, FileBatches);
        `data` still gives the eval batches, the tokenizer and the row shape."""
        self.config, self.workdir, self.data = config, workdir, data
        self.checkpoints = None
        self.last_saved_step = -1
        self.initial_eval: dict[str, Any] | None = None  # the eval before the first update
        if config.checkpoint.enabled:
            self.checkpoints = Checkpoints(
                rundir.checkpoints_path(workdir),
                keep_last=config.checkpoint.keep_last,
                keep_best=config.checkpoint.keep_best,
                async_save=config.checkpoint.async_save,
                on_saved=mirror.publish if mirror is not None else None,
            )
        plan = compile_plan.plan_run(
            config,
            mesh or sharding.mesh_for(config),
            model,
            seq_len=data.seq_len,
            max_segments=data.max_segments,
            trainable=trainable,
            pad_token_id=getattr(data.tokenizer, "pad_token_id", None),
            images=data.images,
        )
        self.steps, self.state = plan.steps, plan.state
        self.source = (batch_source or self._default_source)(self.steps)
        self.sampled_eval, self.has_eval = self._eval_kind()
        # The source's state after the last batch training consumed (what a checkpoint
        # records; a prefetching source reads ahead of it).
        self.data_state = self.source.get_state()
        if self.steps.reference is not None:
            self.precompute_reference()
        self.model_summary = model_summary(model.config.hf_config)
        self.early_stopping = EarlyStopping(
            config.eval.early_stopping_patience, config.eval.early_stopping_min_delta
        )
        # Model FLOPs for MFU: the decoder's and the vision part's (train/vision_flops.py).
        adapted = bool(adapter_methods.enabled_methods(config))
        trained, objective = self.state["params"], self.steps.objective
        self.flops_per_token = step_flops_per_token(model.config, data, trained, adapted, objective)
        self.peak_flops = peak_flops_per_device(config.log.peak_tflops_per_device)
        self.writer = MetricsWriter.for_run(config, workdir, lambda: setup_figures(self))

    def _eval_kind(self) -> tuple[Callable | None, bool]:
        """(the source's own eval, whether there is anything to evaluate): online RL evaluates
        by sampling held-out prompts (its source's `evaluate`), the rest by a loss."""
        sampled = getattr(self.source, "evaluate", None)
        if sampled is not None:
            return sampled, self.source.has_eval
        return None, next(iter(self.data.eval_batches()), None) is not None

    def _default_source(self, steps: compile_plan.Steps) -> BatchSource:
        producer = PRODUCERS.get(registry.kind_of(self.config).reads)
        if producer is not None:
            return producer(self.config, self.workdir, self.data, steps)
        rows = self.config.train.global_batch_size
        return FileBatches(self.data, steps.batch_shardings, rows, self.config.data.prefetch)

    def precompute_reference(self) -> None:
        """DPO's reference='precomputed': the reference log-probs of every train and eval pair,
        in one pass with the initial weights (model.name_or_path's, also on a resume: the
        same program on the same weights and rows gives bitwise the same values, so nothing
        is stored in checkpoints)."""
        if self.data.precompute_reference is None:
            raise ConfigError(
                "config.preference.reference='precomputed': this data loader cannot carry "
                "reference log-probs; use data.loader='memory'."
            )
        start, params = time.perf_counter(), self.state["params"]
        self.data.precompute_reference(
            lambda rows: self.steps.reference(params, rows), self.config.eval.global_batch_size
        )
        log.info("reference log-probs precomputed in %.1f s", time.perf_counter() - start)

    # --- Eval ---------------------------------------------------------------------------

    def run_eval(self, step: int) -> dict[str, float]:
        log.info("step %d: evaluating", step)
        if self.sampled_eval is not None:
            metrics = self.sampled_eval(self.steps.model_of(self.state["params"]))
        else:
            metrics = self._loss_eval()
        stop = self.early_stopping.update(step, selection_score(metrics))
        best = self.early_stopping.best_loss
        if "eval/loss" in metrics:
            metrics["eval/best_loss"] = best
        else:
            metrics["eval/best_reward"] = -best
        metrics["eval/best_step"] = self.early_stopping.best_step
        self.writer.write(step, metrics)
        metrics["stop"] = stop
        return metrics

    def _loss_eval(self) -> dict[str, Any]:
        metrics = evaluate(self.steps, self.state["params"], self.data.eval_batches())
        for name, batches in self.data.eval_sets.items():  # a mixture's sources, each alone
            part = evaluate(self.steps, self.state["params"], batches())
            metrics |= {f"eval/{name}/{k.removeprefix('eval/')}": v for k, v in part.items()}
        return metrics | self._model_metrics()

    def _model_metrics(self) -> dict[str, Any]:
        """On the live params: eval.harness_tasks' scores, and greedy replies to the first eval
        prompts (exact match and samples, eval config)."""
        model = self.steps.model_of(self.state["params"])
        metrics = harness_metrics(model, self.data.tokenizer, self.config.eval)
        count = max(self.config.eval.generate_examples, self.config.eval.show_samples)
        prompts = self.data.eval_prompts[:count]
        if not prompts or self.data.tokenizer is None:
            return metrics
        model_dir = Path(self.config.model.name_or_path)
        return metrics | generation_metrics(
            model,
            self.data.tokenizer,
            prompts,
            stop_token_ids=chat_stop_token_ids(
                self.data.tokenizer, model_dir if model_dir.is_dir() else None
            ),
            max_new_tokens=self.config.eval.max_new_tokens,
            show=self.config.eval.show_samples,
            images=self.data.eval_images[:count] or None,
        )

    # --- Checkpoints --------------------------------------------------------------------

    def resume(self) -> None:
        """Continues from the newest complete checkpoint in WORKDIR, or starts from init_from."""
        if self.checkpoints is not None and self.checkpoints.steps():
            restored = self.checkpoints.restore_latest(
                abstract_like(self.state), self.config, self.model_summary
            )
            if restored is not None:
                step, self.state, data_state, meta = restored
                self.source.set_state(data_state)
                self.data_state = data_state
                self.last_saved_step = step
                saved = meta.get("trainer", {})
                self.early_stopping.load(saved.get("early_stopping", {}))
                self.initial_eval = saved.get("initial_eval") or None  # for the final report
                self.writer.drop_after(step)  # steps past it run again, as the same steps
                log.info("resumed from %s at step %d", self.checkpoints.directory, step)
                return
        if self.config.checkpoint.init_from:
            self.init_from(self.config.checkpoint.init_from)

    def init_from(self, workdir: str) -> None:
        """Parameters of another run's best (else newest) checkpoint; optimizer and step fresh."""
        field = "config.checkpoint.init_from"
        local = bucket_mirror.readable_run(workdir, self.config.checkpoint.staging_dir, field)
        source = rundir.open_run(local, field)
        step = rundir.pick_step(source, "best")
        changes = config_changes(source.meta(step)["config"], self.config, ADAPTER_FIELDS)
        if changes:
            raise ConfigError(
                f"config.checkpoint.init_from={workdir}: that run trained other parameters "
                f"({'; '.join(changes)}), so its checkpoint does not fit this run's config.lora. "
                f"Export it (python -m sft_jax.export --workdir={workdir} --out=DIR) and set "
                "config.model.name_or_path=DIR instead."
            )
        params = source.restore_params(step, abstract_like(self.state["params"]))
        self.state = {**self.state, "params": params}
        log.info("initialized parameters from %s, step %d", source.directory, step)

    def save(self, step: int, metrics: dict[str, float] | None = None) -> None:
        if self.checkpoints is None or step == self.last_saved_step:
            return
        first = {k: v for k, v in (self.initial_eval or {}).items() if isinstance(v, float | int)}
        trainer_state = {
            "early_stopping": self.early_stopping.dump(),
            "initial_eval": first,
            "model": self.model_summary,
        }
        self.checkpoints.save(
            step, self.state, self.data_state, self.config, metrics, trainer_state
        )
        self.last_saved_step = step

    # --- The loop -------------------------------------------------------------------------

    def train(self) -> dict[str, Any]:
        """Runs to config.train.steps, an early stop or a stop signal, saving on the way.

        Step s's metrics are read once step s+1 is queued, so the device never waits on the
        host; before any save they are read first, so a non-finite step is never saved.
        """
        step = int(jax.device_get(self.state["step"]))
        progress = Progress(self.config.train.steps, step, self.config.log.every_steps)
        summary: dict[str, Any] = {"start_step": step, "interrupted": False, "stopped_early": False}
        # A signal during the first eval stops the run once that eval is saved.
        with StopSignal() as stop:
            self._eval_at_start(step, progress)
            if self.initial_eval:
                summary["initial_eval"] = self.initial_eval
            with self.source.open(lambda: self.state["params"]) as feed:
                step = self._loop(step, feed, stop, progress, summary)
        progress.close()
        if summary["interrupted"]:
            progress.message(
                f"stopped by signal at step {step}; checkpoint saved. Run the same "
                "command again to resume."
            )
        summary |= {
            "end_step": step,
            "best_step": self.early_stopping.best_step,
            "best_eval_loss": self.early_stopping.best_loss,
        }
        return summary

    def _eval_at_start(self, step: int, progress: Progress) -> None:
        if self.config.eval.at_start and step == 0 and self.has_eval:
            self.initial_eval = self.run_eval(step)
            self.initial_eval.pop("stop")
            progress.message(eval_message(step, self.initial_eval))
            self.save(0, self.initial_eval)  # the untrained model can be the best one to export

    def _loop(
        self,
        step: int,
        feed: Iterator[tuple[Any, Any]],
        stop: StopSignal,
        progress: Progress,
        summary: dict,
    ) -> int:
        """Steps until the end, an early stop or a signal; returns the step reached (saved)."""
        total, eval_every = self.config.train.steps, self.config.eval.every_steps
        save_every = self.config.checkpoint.every_steps
        pending, last_time = None, time.perf_counter()
        while step < total and not summary["stopped_early"]:
            if stop.agreed():
                summary["interrupted"] = True
                break
            batch, self.data_state = next(feed)
            host_metrics = self.source.metrics()  # the batch's own (online RL: its rollout's)
            self.state, metrics = self.steps.train(self.state, batch)
            step += 1
            if pending is not None:  # the previous step's metrics: the device is busy already
                last_time = self._log_train(*pending, last_time, progress)
            pending = (step, metrics, host_metrics)
            eval_due = (eval_every and step % eval_every == 0) or step == total
            save_due = (save_every and step % save_every == 0) or step == total
            if not (eval_due or save_due):
                continue
            last_time = self._log_train(*pending, last_time, progress)
            pending = None
            result = self.run_eval(step) if eval_due and self.has_eval else None
            if result is not None:
                progress.message(eval_message(step, result))
                summary["final_eval"] = result
                summary["stopped_early"] = result.pop("stop")
            self.save(step, result)
            last_time = time.perf_counter()
        if pending is not None:
            self._log_train(*pending, last_time, progress)
        self.save(step)  # the step reached: after a signal or an early stop
        return step

    def _log_train(
        self, step: int, metrics: Any, host: dict, last_time: float, progress: Progress
    ) -> float:
        values = jax.device_get(metrics)
        self._check_finite(step, values)
        now = time.perf_counter()
        values = {k: float(v) for k, v in values.items()} | self._throughput(now - last_time)
        values |= host
        if step % self.config.log.every_steps == 0 or step == self.config.train.steps:
            self.writer.write(step, values)
        progress.update(step, values)
        return now

    def _throughput(self, seconds: float) -> dict[str, float]:
        tokens = self.config.train.global_batch_size * self.data.seq_len
        values = {"train/step_seconds": seconds, "train/tokens_per_sec": tokens / seconds}
        if self.peak_flops:
            achieved = tokens * self.flops_per_token / seconds / jax.device_count()
            values["train/mfu"] = achieved / self.peak_flops
        return values

    def _check_finite(self, step: int, metrics: dict[str, Any]) -> None:
        loss, grad_norm = float(metrics["train/loss"]), float(metrics["train/grad_norm"])
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            raise TrainingDivergedError(
                f"step {step}: loss {loss}, grad norm {grad_norm}; stopping before anything "
                "more is saved. Lower config.train.learning_rate, check the data, or use float32."
            )

    def close(self) -> None:
        try:
            if self.checkpoints is not None:
                self.checkpoints.close()  # raises if the last save failed
        finally:
            self.writer.close()


def run(
    config: Any,
    workdir: str | Path,
    data_factory: Callable[..., DataSource],
    batch_source: Callable[[compile_plan.Steps], BatchSource] | None = None,
) -> dict:
    """Everything main.py does after parsing flags. A bucket `workdir` (s3://, gs://) runs in
    its local staging copy, mirrored to the bucket (sft_jax.workdir.bucket_mirror).
    data_factory(config, feed) opens the data; feed (sharding.row_feed) says which rows of each
    batch it feeds. batch_source: see Trainer (default: the data's train rows). `config` is a
    RunSpec, or the ConfigDict of a config file (the Python API's edge: made a RunSpec here)."""
    config = RunSpec.of(config)
    distributed.initialize(config.distributed)
    check_mesh(config)
    why = "as configured (config.mesh)"
    if config.mesh.auto:
        config, why = plan_search.auto_config(config)
    mesh = sharding.mesh_for(config)
    log.info("mesh: %s; %s", plan_search.mesh_summary(mesh), why)
    check_values(config, mesh.size, sharding.batch_shards(mesh))
    mirror = _bucket_mirror(config, str(workdir))
    local = mirror.staging if mirror is not None else Path(workdir)
    with rundir.lock(local), rundir.run_log(local):
        if mirror is not None and jax.process_index() == 0:
            mirror.pull_run()
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("sft_jax: staging copy pulled")
        return _run_locked(config, local, mesh, data_factory, mirror, batch_source)


def _bucket_mirror(config: RunSpec, workdir: str) -> BucketMirror | None:
    """For a bucket WORKDIR: its mirror, once the bucket answers (before any work starts)."""
    if not is_remote(workdir):
        return None
    if jax.process_count() > 1 and not config.checkpoint.staging_dir:
        raise ConfigError(
            f"--workdir={workdir} with {jax.process_count()} processes: set "
            "config.checkpoint.staging_dir to a directory every process sees (a shared file "
            "system): Orbax writes each process's shards of a step into one staging folder."
        )
    return BucketMirror.open(workdir, config.checkpoint.staging_dir, "--workdir")


def _run_locked(
    config: RunSpec,
    workdir: Path,
    mesh: Mesh,
    data_factory: Callable,
    mirror: BucketMirror | None,
    batch_source: Callable[[compile_plan.Steps], BatchSource] | None,
) -> dict:
    config = with_loader(config, rundir.saved_config(workdir))  # "auto": a resume keeps its own
    data = data_factory(config, sharding.row_feed(mesh))  # a data-parallel group: same rows
    model, _, trainable = build_model(config, mesh)
    check_tokenizer_fits(data.tokenizer, model.config)
    trainer = Trainer(
        config, workdir, model, data, trainable, mesh=mesh, mirror=mirror, batch_source=batch_source
    )
    try:
        trainer.resume()
        summary = trainer.train()
    finally:
        trainer.close()
    summary["curves"] = str(trainer.writer.curves_path or "")  # "" where none was drawn
    if config.export.at_end != "none" and not summary["interrupted"]:
        source = mirror.url if mirror is not None else workdir
        again = f"python -m sft_jax.export --workdir={source}"
        with signals_raise(f"the export stopped; the checkpoints are complete: {again}"):
            out = export_run(
                workdir,
                which=config.export.at_end,
                out=config.export.dir or None,
                staging_root=config.checkpoint.staging_dir,
                mirror=mirror,
            )
        summary["export"] = str(out)
    if mirror is not None and jax.process_index() == 0:
        mirror.push_run()
    if jax.process_index() == 0:
        log.info("%s", final_report(summary))
    return summary
