"""The training loop: model and data on the mesh, compiled steps, eval, early stopping, metrics."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from sft_jax import distributed, sharding
from sft_jax.checkpointing import (
    ADAPTER_FIELDS,
    Checkpoints,
    StopSignal,
    abstract_like,
    config_changes,
)
from sft_jax.config_check import check_values
from sft_jax.errors import ConfigError
from sft_jax.export import export_run, open_run, pick_step
from sft_jax.generate import chat_stop_token_ids
from sft_jax.metrics import MetricsWriter, Progress, peak_flops_per_device, training_flops_per_token
from sft_jax.model_setup import build_model
from sft_jax.models import CausalLM
from sft_jax.models.decoder import use_attention
from sft_jax.optim import make_optimizer
from sft_jax.prefetch import Prefetch
from sft_jax.samples import generation_metrics
from sft_jax.step import (
    StepMemory,
    StepOptions,
    Steps,
    build_steps,
    device_batch,
    init_state,
)

log = logging.getLogger(__name__)


class TrainingDivergedError(RuntimeError):
    """The loss or gradient norm stopped being finite."""


@dataclasses.dataclass
class DataSource:
    """What the loop needs from the data layer."""

    # Endless iterator of this process's rows, with get_state() / set_state(state) (JSON).
    train_batches: Iterator[dict[str, np.ndarray]]
    eval_batches: Callable[[], Iterable[dict[str, np.ndarray]]]  # one pass over the eval set
    seq_len: int
    # Most segments in any row of train or eval batches (documents, and padding as one more);
    # 0: unknown, config.data.max_documents_per_row + 1 is assumed.
    max_segments: int = 0
    tokenizer: Any = None
    # (prompt tokens, reference reply tokens) of eval examples, for generation during eval.
    eval_prompts: list[tuple[np.ndarray, np.ndarray]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class EarlyStopping:
    """Stops after `patience` evaluations without an improvement of at least `min_delta`."""

    patience: int
    min_delta: float
    best_loss: float = math.inf
    best_step: int = -1
    evals_without_improvement: int = 0

    def update(self, step: int, loss: float) -> bool:
        """Records an eval; True when training should stop."""
        if loss < self.best_loss - self.min_delta:
            self.best_loss, self.best_step = loss, step
            self.evals_without_improvement = 0
            return False
        self.evals_without_improvement += 1
        return 0 < self.patience <= self.evals_without_improvement

    def dump(self) -> dict[str, Any]:
        """What a checkpoint keeps, so patience and the best step survive a restart."""
        best = None if math.isinf(self.best_loss) else self.best_loss
        return {"best_loss": best, "best_step": self.best_step,
                "evals_without_improvement": self.evals_without_improvement}  # fmt: skip

    def load(self, saved: dict[str, Any]) -> None:
        if saved:
            best = saved["best_loss"]
            self.best_loss = math.inf if best is None else float(best)
            self.best_step = int(saved["best_step"])
            self.evals_without_improvement = int(saved["evals_without_improvement"])


def evaluate(
    steps: Steps, params: Any, batches: Iterable[dict[str, np.ndarray]]
) -> dict[str, float]:
    """Token-weighted mean cross-entropy over every target token of the eval set."""
    nll, count = 0.0, 0.0
    for batch in batches:
        sums = jax.device_get(steps.eval(params, device_batch(batch, steps.batch_shardings)))
        nll += float(sums.nll)
        count += float(sums.target_tokens)
    if count == 0:
        raise ConfigError(
            "the eval set has no target tokens: check config.data.eval_files (or "
            "config.data.eval_fraction) and config.data.train_on."
        )
    loss = nll / count
    return {
        "eval/loss": loss,
        "eval/perplexity": math.exp(min(loss, 80.0)),
        "eval/target_tokens": count,
    }


def eval_message(step: int, metrics: dict[str, Any]) -> str:
    text = f"step {step}: eval loss {metrics['eval/loss']:.4f}"
    if "eval/exact_match" in metrics:
        text += f", exact match {metrics['eval/exact_match']:.1%} of {metrics['eval/generated']}"
    if metrics.get("eval/samples"):
        text += "\n" + metrics["eval/samples"]
    return text


# remat "auto" tries these in turn, least recomputation first (and so most memory).
AUTO_REMAT = ("none", "save_matmuls", "full")
# The share of a device's memory a train step's plan may fill: the rest absorbs the
# allocator's fragmentation and the buffers outside the step (prefetched batches, eval).
FIT_FRACTION = 0.95


def device_bytes_limit() -> int | None:
    """What one device can hold (its allocator's limit), the least over all processes so that
    every process compiles the same program; None where jax does not say (CPU)."""
    stats = jax.local_devices()[0].memory_stats() or {}
    limit = int(stats.get("bytes_limit") or 0)
    if jax.process_count() > 1:  # collective: every process calls this once, at the start
        limit = int(np.min(multihost_utils.process_allgather(np.int64(limit))))
    return limit or None


def out_of_memory(error: Exception) -> bool:
    """Whether a compile failed for want of device memory (XLA:TPU refuses such a program at
    compile time: "RESOURCE_EXHAUSTED: ... Ran out of memory in memory space hbm")."""
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "Ran out of memory" in text


def _lower_it(remat: str) -> str:
    remat_advice = (
        "config.model.remat='auto' (or 'full'), " if remat not in ("full", "auto") else ""
    )
    return (
        f"Lower it with {remat_advice}a higher config.train.gradient_accumulation_steps (the "
        "same global batch, fewer rows at once), a smaller config.train.loss_chunk_size, more "
        "devices, or LoRA."
    )


def _fits(plan: StepMemory | None, limit: int | None) -> bool:
    """Whether a plan fits FIT_FRACTION of the limit; True where either is unknown."""
    return limit is None or plan is None or plan.total <= FIT_FRACTION * limit


def compile_with_remat(
    build: Callable[[CausalLM], Steps], model: CausalLM, remat: str, limit: int | None
) -> Steps:
    """The compiled steps with `remat`. "auto" compiles AUTO_REMAT in turn and keeps the first
    whose train step XLA plans within FIT_FRACTION of `limit` bytes per device ("none" where
    the limit is unknown; "full" where none fits); a compile refused for want of memory counts
    as not fitting. No step runs."""
    error = None
    for policy in AUTO_REMAT if remat == "auto" else (remat,):
        model.remat = policy
        try:
            steps = build(model)
        except Exception as e:
            if not out_of_memory(e):
                raise
            error, steps = e, None
            log.info("remat %r: the compiler ran out of device memory (%s)", policy, str(e)[:300])
            continue
        plan = steps.train_memory
        if remat != "auto" or _fits(plan, limit):
            break
        log.info(
            "remat %r: the train step plans %.2f GiB per device, over %.0f%% of %.2f GiB",
            policy, plan.total / 2**30, 100 * FIT_FRACTION, limit / 2**30,
        )  # fmt: skip
    if steps is None:
        raise ConfigError(
            f"the train step does not fit in device memory with config.model.remat={remat!r} "
            f"(the compiler: {str(error).splitlines()[0][:300]}). {_lower_it(remat)}"
        ) from error
    if remat == "auto":
        plan = steps.train_memory
        if limit is None:
            why = "the device's memory is unknown"
        elif plan is None:
            why = "XLA gives no memory plan here"
        elif _fits(plan, limit):
            why = f"the least recomputation that fits {100 * FIT_FRACTION:.0f}% of the device"
        else:
            why = f"no policy fits {100 * FIT_FRACTION:.0f}% of the device; the last one"
        log.info("remat: %s (auto: %s)", model.remat, why)
    return steps


def warn_if_over_memory(plan: StepMemory | None, limit: int | None, remat: str) -> None:
    """Logs the train step's planned memory, and warns before the first step where it exceeds
    what the device can hold (the step would fail with RESOURCE_EXHAUSTED)."""
    if plan is None:
        return
    log.info("train step memory: %s", plan.describe())
    if limit and plan.total > limit:
        log.warning(
            "the train step plans %.2f GiB per device but the device holds %.2f GiB: it will "
            "likely run out of memory. %s", plan.total / 2**30, limit / 2**30, _lower_it(remat),
        )  # fmt: skip


class Trainer:
    """Owns the mesh, the state and the compiled steps of one run."""

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        workdir: Path,
        model: CausalLM,
        data: DataSource,
        trainable: Any = nnx.Param,
    ):
        self.config, self.workdir, self.data = config, workdir, data
        self.has_eval = next(iter(data.eval_batches()), None) is not None
        train = config.train
        self.checkpoints = None
        self.last_saved_step = -1
        self.initial_eval: dict[str, Any] | None = None  # the eval before the first update
        # The data iterator's state after the last batch training consumed (what a checkpoint
        # records; the prefetch thread reads ahead of it).
        self.data_state = data.train_batches.get_state()
        if config.checkpoint.enabled:
            self.checkpoints = Checkpoints(
                workdir / "checkpoints",
                keep_last=config.checkpoint.keep_last,
                keep_best=config.checkpoint.keep_best,
                async_save=config.checkpoint.async_save,
            )
        self.mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
        self.tx, self.schedule = make_optimizer(train)
        self.state, state_shardings = init_state(model, self.tx, self.mesh, trainable)
        build = functools.partial(
            build_steps,
            tx=self.tx,
            schedule=self.schedule,
            mesh=self.mesh,
            state_shardings=state_shardings,
            train_rows=train.global_batch_size,
            eval_rows=config.eval.global_batch_size,
            seq_len=data.seq_len,
            options=StepOptions(
                gradient_accumulation_steps=train.gradient_accumulation_steps,
                z_loss_weight=train.z_loss_weight,
                loss_chunk_size=train.loss_chunk_size,
                dropout_seed=train.seed,
            ),
            trainable=trainable,
        )

        def build_or_fall_back(model: CausalLM) -> Steps:
            try:
                return build(model)
            except Exception as e:
                # "auto" promised the fastest kernel that works: a fused one this GPU's cuDNN
                # (or TPU) will not compile gives way to einsums, loudly. A named kernel fails,
                # and so does a step too large for the device (compile_with_remat's business).
                if (config.model.attention != "auto" or model.config.attention == "xla"
                        or out_of_memory(e)):  # fmt: skip
                    raise
                log.warning(
                    "attention %r did not compile (%s: %s); config.model.attention='auto' "
                    "falls back to 'xla'.", model.config.attention, type(e).__name__,
                    str(e)[:500],
                )  # fmt: skip
                use_attention(model, "xla")
                return build(model)

        limit = device_bytes_limit()
        self.steps = compile_with_remat(build_or_fall_back, model, config.model.remat, limit)
        self.model_config = model.config
        self.writer = MetricsWriter(workdir)
        self.early_stopping = EarlyStopping(
            config.eval.early_stopping_patience, config.eval.early_stopping_min_delta
        )
        adapters = None
        if trainable is not nnx.Param:  # LoRA: the base is frozen, see training_flops_per_token
            adapters = sum(x.size for x in jax.tree.leaves(self.state["params"]))
        self.flops_per_token = training_flops_per_token(model.config, data.seq_len, adapters)
        self.peak_flops = peak_flops_per_device(config.log.peak_tflops_per_device)
        log.info("train and eval steps compiled in %.1f s", self.steps.compile_seconds)
        warn_if_over_memory(self.steps.train_memory, limit, config.model.remat)

    def run_eval(self, step: int) -> dict[str, float]:
        metrics = evaluate(self.steps, self.state["params"], self.data.eval_batches())
        metrics |= self._generation_metrics()
        stop = self.early_stopping.update(step, metrics["eval/loss"])
        metrics |= {
            "eval/best_loss": self.early_stopping.best_loss,
            "eval/best_step": self.early_stopping.best_step,
        }
        self.writer.write(step, metrics)
        metrics["stop"] = stop
        return metrics

    def _generation_metrics(self) -> dict[str, Any]:
        """Greedy replies to the first eval prompts: exact match and samples (eval config)."""
        count = max(self.config.eval.generate_examples, self.config.eval.show_samples)
        prompts = self.data.eval_prompts[:count]
        if not prompts or self.data.tokenizer is None:
            return {}
        model_dir = Path(self.config.model.name_or_path)
        return generation_metrics(
            self.steps.model_of(self.state["params"]),
            self.data.tokenizer,
            prompts,
            stop_token_ids=chat_stop_token_ids(
                self.data.tokenizer, model_dir if model_dir.is_dir() else None
            ),
            max_new_tokens=self.config.eval.max_new_tokens,
            show=self.config.eval.show_samples,
        )

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

    def resume(self) -> None:
        """Continues from the newest complete checkpoint in WORKDIR, or starts from init_from."""
        if self.checkpoints is not None and self.checkpoints.steps():
            restored = self.checkpoints.restore_latest(abstract_like(self.state), self.config)
            if restored is not None:
                step, self.state, data_state, meta = restored
                self.data.train_batches.set_state(data_state)
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
        source = open_run(workdir, "config.checkpoint.init_from")
        step = pick_step(source, "best")
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
        trainer_state = {"early_stopping": self.early_stopping.dump(), "initial_eval": first}
        self.checkpoints.save(
            step, self.state, self.data_state, self.config, metrics, trainer_state
        )
        self.last_saved_step = step

    def train(self) -> dict[str, Any]:
        """Runs to config.train.steps, an early stop or a stop signal, saving on the way.

        Step s's metrics are read once step s+1 is queued, so the device never waits on the
        host; before any save they are read first, so a non-finite step is never saved.
        """
        total, eval_every = self.config.train.steps, self.config.eval.every_steps
        save_every = self.config.checkpoint.every_steps
        step = int(jax.device_get(self.state["step"]))
        progress = Progress(total, step, self.config.log.every_steps)
        summary: dict[str, Any] = {"start_step": step, "interrupted": False, "stopped_early": False}
        if self.config.eval.at_start and step == 0 and self.has_eval:
            self.initial_eval = self.run_eval(step)
            self.initial_eval.pop("stop")
            progress.message(eval_message(step, self.initial_eval))
            self.save(0, self.initial_eval)  # the untrained model can be the best one to export
        if self.initial_eval:
            summary["initial_eval"] = self.initial_eval
        pending, last_time = None, time.perf_counter()
        shardings = self.steps.batch_shardings
        feed = Prefetch(self.data.train_batches, lambda rows: device_batch(rows, shardings),
                        depth=self.config.data.prefetch)  # fmt: skip
        with StopSignal() as stop, contextlib.closing(feed):
            while step < total and not summary["stopped_early"]:
                if stop.agreed():
                    summary["interrupted"] = True
                    break
                batch, self.data_state = next(feed)
                self.state, metrics = self.steps.train(self.state, batch)
                step += 1
                if pending is not None:  # the previous step's metrics: the device is busy already
                    last_time = self._log_train(*pending, last_time, progress)
                pending = (step, metrics)
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
        progress.close()
        if summary["interrupted"]:
            progress.message(f"stopped by signal at step {step}; checkpoint saved. Run the same "
                             "command again to resume.")  # fmt: skip
        summary |= {"end_step": step, "best_step": self.early_stopping.best_step,
                    "best_eval_loss": self.early_stopping.best_loss}  # fmt: skip
        return summary

    def close(self) -> None:
        if self.checkpoints is not None:
            self.checkpoints.close()
        self.writer.close()

    def _log_train(self, step: int, metrics: Any, last_time: float, progress: Progress) -> float:
        values = jax.device_get(metrics)
        self._check_finite(step, values)
        now = time.perf_counter()
        values = {k: float(v) for k, v in values.items()} | self._throughput(now - last_time)
        if step % self.config.log.every_steps == 0 or step == self.config.train.steps:
            self.writer.write(step, values)
        progress.update(step, values)
        return now


def run(
    config: ml_collections.ConfigDict, workdir: str | Path, data_factory: Callable[..., DataSource]
) -> dict:
    """Everything main.py does after parsing flags."""
    workdir = Path(workdir)
    distributed.initialize(config.distributed)
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    check_values(config, mesh.size, mesh.shape["data"] * mesh.shape["fsdp"])
    data = data_factory(config)
    model, _, trainable = build_model(config, mesh, max_segments=data.max_segments or None)
    if data.tokenizer is not None and len(data.tokenizer) > model.config.vocab_size:
        raise ConfigError(
            f"the tokenizer has {len(data.tokenizer)} tokens but the model's vocabulary only "
            f"{model.config.vocab_size}: ids past it would index nothing. Use the model's own "
            "tokenizer (config.data.tokenizer='') or resize the model's embeddings first."
        )
    trainer = Trainer(config, workdir, model, data, trainable)
    try:
        trainer.resume()
        summary = trainer.train()
    finally:
        trainer.close()
    if config.export.at_end != "none" and not summary["interrupted"]:
        summary["export"] = str(
            export_run(workdir, which=config.export.at_end, out=config.export.dir or None)
        )
    if jax.process_index() == 0:
        log.info("%s", final_report(summary))
    return summary


def final_report(summary: dict[str, Any]) -> str:
    """What changed over the run, in a few lines: eval loss, exact match, where things are."""
    first, last = summary.get("initial_eval"), summary.get("final_eval")
    lines = [f"finished at step {summary['end_step']} (started at {summary['start_step']})"]
    if first and last:
        lines.append(f"eval loss {first['eval/loss']:.4f} -> {last['eval/loss']:.4f} "
                     f"({first['eval/loss'] / last['eval/loss']:.1f}x lower)")  # fmt: skip
        if "eval/exact_match" in first:
            lines.append(f"exact match of greedy replies {first['eval/exact_match']:.1%} -> "
                         f"{last['eval/exact_match']:.1%}")  # fmt: skip
    if summary.get("best_step", -1) >= 0:
        lines.append(f"best eval loss {summary['best_eval_loss']:.4f} at step "
                     f"{summary['best_step']}")  # fmt: skip
    if summary.get("export"):
        lines.append(f"exported to {summary['export']}")
    return "\n".join(lines)
