"""The training loop: model and data on the mesh, compiled steps, eval, early stopping, metrics."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sft_jax import distributed, sharding
from sft_jax.metrics import MetricsWriter, Progress, peak_flops_per_device, training_flops_per_token
from sft_jax.models import CausalLM, from_pretrained
from sft_jax.optim import make_optimizer
from sft_jax.step import StepOptions, Steps, build_steps, device_batch, init_state

log = logging.getLogger(__name__)
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class TrainingDivergedError(RuntimeError):
    """The loss or gradient norm stopped being finite."""


@dataclasses.dataclass
class DataSource:
    """What the loop needs from the data layer."""

    train_batches: Iterator[dict[str, np.ndarray]]  # endless, this process's rows
    eval_batches: Callable[[], Iterable[dict[str, np.ndarray]]]  # one pass over the eval set
    seq_len: int
    tokenizer: Any = None


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


def dtype_of(name: str, field: str) -> Any:
    if name not in DTYPES:
        raise ValueError(f"{field}={name!r}: expected one of {', '.join(DTYPES)}.")
    return DTYPES[name]


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
        raise ValueError("the eval set has no target tokens; check config.data.eval_files.")
    loss = nll / count
    return {
        "eval/loss": loss,
        "eval/perplexity": math.exp(min(loss, 80.0)),
        "eval/target_tokens": count,
    }


class Trainer:
    """Owns the mesh, the state and the compiled steps of one run."""

    def __init__(
        self, config: ml_collections.ConfigDict, workdir: Path, model: CausalLM, data: DataSource
    ):
        self.config, self.workdir, self.data = config, workdir, data
        train = config.train
        self.mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
        self.tx, self.schedule = make_optimizer(train)
        self.state, state_shardings = init_state(model, self.tx, self.mesh)
        self.steps = build_steps(
            model,
            self.tx,
            self.schedule,
            self.mesh,
            state_shardings,
            train_rows=train.global_batch_size,
            eval_rows=config.eval.global_batch_size,
            seq_len=data.seq_len,
            options=StepOptions(
                gradient_accumulation_steps=train.gradient_accumulation_steps,
                z_loss_weight=train.z_loss_weight,
                loss_chunk_size=train.loss_chunk_size,
            ),
        )
        self.model_config = model.config
        self.writer = MetricsWriter(workdir)
        self.early_stopping = EarlyStopping(
            config.eval.early_stopping_patience, config.eval.early_stopping_min_delta
        )
        self.flops_per_token = training_flops_per_token(model.config, data.seq_len)
        self.peak_flops = peak_flops_per_device(config.log.peak_tflops_per_device)
        log.info("train and eval steps compiled in %.1f s", self.steps.compile_seconds)

    def run_eval(self, step: int) -> dict[str, float]:
        metrics = evaluate(self.steps, self.state["params"], self.data.eval_batches())
        stop = self.early_stopping.update(step, metrics["eval/loss"])
        metrics |= {
            "eval/best_loss": self.early_stopping.best_loss,
            "eval/best_step": self.early_stopping.best_step,
        }
        self.writer.write(step, metrics)
        metrics["stop"] = stop
        return metrics

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

    def train(self) -> dict[str, Any]:
        """Runs to config.train.steps or an early stop; step s's metrics are read once s+1 runs."""
        total, eval_every = self.config.train.steps, self.config.eval.every_steps
        step = int(jax.device_get(self.state["step"]))
        progress = Progress(total, step, self.config.log.every_steps)
        summary: dict[str, Any] = {"start_step": step}
        if self.config.eval.at_start:
            summary["initial_eval"] = self.run_eval(step)
            progress.message(f"step {step}: eval loss {summary['initial_eval']['eval/loss']:.4f}")
        pending, last_time = None, time.perf_counter()
        stopped_early = False
        while step < total and not stopped_early:
            batch = device_batch(next(self.data.train_batches), self.steps.batch_shardings)
            self.state, metrics = self.steps.train(self.state, batch)
            step += 1
            if pending is not None:  # the previous step's metrics: the device is already busy
                last_time = self._log_train(*pending, last_time, progress)
            pending = (step, metrics)
            if (eval_every and step % eval_every == 0) or step == total:
                last_time = self._log_train(*pending, last_time, progress)
                pending = None
                result = self.run_eval(step)
                progress.message(f"step {step}: eval loss {result['eval/loss']:.4f}")
                stopped_early = result["stop"]
                summary["final_eval"] = result
                last_time = time.perf_counter()
        if pending is not None:
            self._log_train(*pending, last_time, progress)
        progress.close()
        summary |= {
            "end_step": step,
            "stopped_early": stopped_early,
            "best_step": self.early_stopping.best_step,
            "best_eval_loss": self.early_stopping.best_loss,
        }
        if stopped_early:
            log.info(
                "early stop at step %d: best eval loss %.4f at step %d",
                step,
                self.early_stopping.best_loss,
                self.early_stopping.best_step,
            )
        return summary

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
    model = from_pretrained(
        config.model.name_or_path,
        mesh=mesh,
        param_dtype=dtype_of(config.model.param_dtype, "config.model.param_dtype"),
        dtype=dtype_of(config.model.compute_dtype, "config.model.compute_dtype"),
        remat=config.model.remat,
    )
    data = data_factory(config)
    trainer = Trainer(config, workdir, model, data)
    try:
        return trainer.train()
    finally:
        trainer.writer.close()
