"""Online RL's batch producer (config.train.objective = "grpo"): each update's rows sampled
from the live params, in this process, on the training mesh.

Rollout r (updates r*mu+1 .. r*mu+mu, mu = grpo.num_iterations) takes P = global_batch_size / G
prompts (the next P of a per-epoch shuffle of the train prompts, seeded by train.seed), samples
G completions of each with the KV-cache sampler (generation/sampler.rollout, seed from
(train.seed, r)), scores them (objectives/rewards), turns the rewards into advantages
(objectives/grpo.advantages) and lays each completion out as one row:

  prompt = [p1 p2 p3], completion = [c1 c2 <eot>]
  input_ids   = [p1 p2 p3 c1 c2 pad ...]
  target_ids  = [p2 p3 c1 c2 <eot> pad ...]
  target_mask = [0  0  1  1  1    0 ...]   (the completion's tokens, stop token included)

with the training forward's log-probs of the completion under the sampling params (the
ratio's denominator, `old_logps`), compared token by token with the sampler's own (the
numerics gate) and, with a KL term, the reference's. Everything a rollout depends on is
(params, r), so a resumed run samples what the uninterrupted one did; with mu > 1 a resume
inside a rollout reads its rows back from WORKDIR/rollouts. Every completion goes to
WORKDIR/completions.jsonl.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from sft_jax.core.errors import ConfigError
from sft_jax.core.spec import RunSpec
from sft_jax.data import DataSource
from sft_jax.data.prompts import Prompt, columns_of
from sft_jax.generation.sampler import Rollout, chat_stop_token_ids, lower_rollout, rollout
from sft_jax.loop.batch_source import Params
from sft_jax.objectives import grpo, grpo_sampling, rewards
from sft_jax.train import memory as memory_plan
from sft_jax.train.compiled import Steps
from sft_jax.train.sharding import device_batch, row_feed

log = logging.getLogger(__name__)

COMPLETIONS_FILE = "completions.jsonl"
ROLLOUTS_DIR = "rollouts"
EVAL_SEED = 2**31 - 1  # held-out prompts are sampled with the same keys at every eval


class Sampled:
    """One rollout's completions, their texts and rewards (before they become rows)."""

    def __init__(self, prompts: list[Prompt], out: Rollout, texts: list[str], table: np.ndarray):
        self.prompts, self.out, self.texts, self.table = prompts, out, texts, table


class GRPOBatches:
    """The BatchSource of online RL (loop/batch_source.py): rows sampled on demand."""

    def __init__(self, config: RunSpec, workdir: Path, data: DataSource, steps: Steps):
        self.config, self.grpo, self.steps = config, config.grpo, steps
        self.prompts, self.tokenizer, self.seq_len = data.prompts, data.tokenizer, data.seq_len
        self.rewards = rewards.rewards_from_config(
            self.grpo.reward_funcs, self.grpo.reward_weights, self.grpo.max_completion_length
        )
        self.weights = np.array([r.weight for r in self.rewards])
        model_dir = Path(config.model.name_or_path)
        self.stop_ids = chat_stop_token_ids(
            self.tokenizer, model_dir if model_dir.is_dir() else None
        )
        self.rows = config.train.global_batch_size
        self.per_step = self.rows // self.grpo.num_generations
        self.workdir = workdir
        self.index, self.tokens_seen = 0, 0
        self.cached: tuple[int, dict[str, np.ndarray]] | None = None  # (rollout, global rows)
        self.last_metrics: dict[str, float] = {}
        self.last_end: float | None = None
        self.has_eval = bool(self.prompts.eval)
        self.pad_id = self.tokenizer.pad_token_id or 0
        self.memory_checked = False
        self.order: tuple[int, np.ndarray] | None = None  # (epoch, its prompt order)

    # --- BatchSource ------------------------------------------------------------------------

    def get_state(self) -> Any:
        return {"batches": self.index, "tokens_seen": self.tokens_seen}

    def set_state(self, state: Any) -> None:
        self.index, self.tokens_seen = int(state["batches"]), int(state["tokens_seen"])
        self.cached = None
        if jax.process_index() == 0:
            _drop_after(self.workdir / COMPLETIONS_FILE, self.index)

    @contextlib.contextmanager
    def open(self, params: Params) -> Iterator[Iterator[tuple[Any, Any]]]:
        def batches() -> Iterator[tuple[Any, Any]]:
            while True:
                rows = self.produce(params(), self.index)
                self.index += 1
                batch = device_batch(self.local(rows), self.steps.batch_shardings, self.rows)
                yield batch, self.get_state()

        yield batches()

    def metrics(self) -> dict[str, float]:
        """Host metrics of the batch drawn last (empty where it reused a rollout)."""
        return self.last_metrics

    # --- Producing rows ---------------------------------------------------------------------

    def check_memory(self, model: Any) -> None:
        """Once, before the first rollout or eval: the sampler's plan fits beside the train
        state (train/memory.check_rollout), or the run stops with the numbers."""
        if self.memory_checked:
            return
        grpo_config, rows = self.grpo, self.rows
        shape = (
            f"{rows} rows x ({grpo_config.max_prompt_length} prompt + "
            f"{grpo_config.max_completion_length} completion) tokens"
        )
        lowered = lower_rollout(
            model, rows, grpo_config.max_prompt_length, grpo_config.max_completion_length
        )
        plan = memory_plan.StepMemory.of(memory_plan.compile_as_planned(lowered))
        limit = memory_plan.device_bytes_limit()
        memory_plan.check_rollout(plan, self.steps.train_memory, limit, shape)
        self.memory_checked = True

    def produce(self, params: Any, index: int) -> dict[str, np.ndarray]:
        """The global rows of update `index` (0-based): rollout index // mu's."""
        number, within = divmod(index, self.grpo.num_iterations)
        self.last_metrics = {}
        if self.cached is not None and self.cached[0] == number:
            return self.cached[1]
        if within:
            rows = self._read_rollout(number)
        else:
            rows = self._sample_rows(params, number, index + 1)
            if self.grpo.num_iterations > 1:
                self._write_rollout(number, rows)
        self.cached = (number, rows)
        return rows

    def prompts_of(self, number: int) -> list[tuple[int, Prompt]]:
        """(index in the train prompts, prompt) of rollout `number`: the next per_step of a
        shuffle per epoch (data.shuffle), seeded by train.seed and the epoch."""
        train, out = self.prompts.train, []
        for position in range(number * self.per_step, (number + 1) * self.per_step):
            epoch, offset = divmod(position, len(train))
            index = int(self._epoch_order(epoch)[offset])
            out.append((index, train[index]))
        return out

    def _epoch_order(self, epoch: int) -> np.ndarray:
        """The prompts' order in `epoch`, drawn once per epoch (not once per prompt)."""
        if self.order is None or self.order[0] != epoch:
            order = np.arange(len(self.prompts.train))
            if self.config.data.shuffle:
                order = np.random.default_rng([self.config.train.seed, epoch]).permutation(order)
            self.order = (epoch, order)
        return self.order[1]

    def sample(self, model: Any, prompts: Sequence[Prompt], repeat: int, greedy: bool, seed: int):
        """`repeat` completions of each prompt, decoded and scored (Sampled)."""
        grpo_config = self.grpo
        ids = [list(p.ids) for p in prompts for _ in range(repeat)]
        out = rollout(
            model,
            ids,
            max_new_tokens=grpo_config.max_completion_length,
            stop_token_ids=self.stop_ids,
            temperature=0.0 if greedy else grpo_config.temperature,
            top_p=grpo_config.top_p,
            top_k=grpo_config.top_k,
            min_p=grpo_config.min_p,
            seed=seed,
            pad_id=self.pad_id,
        )
        texts = [self._text(tokens) for tokens in out.tokens]
        repeated = [p for p in prompts for _ in range(repeat)]
        completions = [
            [{"role": "assistant", "content": text}] if p.conversational else text
            for p, text in zip(repeated, texts, strict=True)
        ]
        table = rewards.score(
            self.rewards,
            [p.prompt for p in repeated],
            completions,
            out.tokens,
            columns_of(list(prompts), repeat),
        )
        return Sampled(repeated, out, texts, table)

    def _text(self, tokens: list[int]) -> str:
        kept = tokens[:-1] if tokens and tokens[-1] in self.stop_ids else tokens
        return self.tokenizer.decode(kept, skip_special_tokens=True)

    def _sample_rows(self, params: Any, number: int, step: int) -> dict[str, np.ndarray]:
        # The updates since the last rollout run ahead of the host: their time ends once the
        # params they write are there (the sampler would wait for them anyway).
        jax.block_until_ready(params)
        update_s = time.perf_counter() - self.last_end if self.last_end is not None else None
        chosen = self.prompts_of(number)
        seed = int(np.random.SeedSequence([self.config.train.seed, number]).generate_state(1)[0])
        g = self.grpo.num_generations
        model = self.steps.model_of(params)
        self.check_memory(model)
        sampled_at = time.perf_counter()
        sampled = self.sample(model, [p for _, p in chosen], g, greedy=False, seed=seed)
        scored_at = time.perf_counter()
        rows, sampler_logps = self._rows(sampled)
        outputs = self.steps.rollout_logps(params, self.local(rows))
        gate = self._correct(rows, sampler_logps, outputs[0])
        grpo_sampling.check_sampling(step, gate, self.grpo.max_sampling_logp_difference)
        if self.grpo.mask_truncated_completions:
            truncated = np.array([s == "length" for s in sampled.out.stop_reasons])
            rows["target_mask"] &= ~truncated[:, None]
        made = self.steps.objective.rollout_fields(
            sampled.table, self.weights, rows["target_mask"], outputs
        )
        rows |= made.fields
        end = time.perf_counter()
        if jax.process_index() == 0:
            self._log_completions(step, chosen, sampled, made.advantages)
        self.tokens_seen += sum(
            len(p.ids) + len(c) for p, c in zip(sampled.prompts, sampled.out.tokens, strict=True)
        )
        times = {"time/sampling_s": scored_at - sampled_at, "time/scoring_s": end - scored_at}
        if update_s is not None:
            times["time/update_s"] = update_s
        gate["entropy"] = float(outputs[2].sum() / max(rows["target_mask"].sum(), 1))
        total = grpo.total_rewards(sampled.table, self.weights)
        self.last_metrics = self._metrics(sampled, total, gate | made.metrics, times)
        self.last_end = time.perf_counter()
        return rows

    def _correct(self, rows, sampler_logps, policy) -> dict[str, float]:
        """The sampler-mismatch figures; with grpo.importance_sampling_correction, rows get
        the correction's weights (objectives/grpo_sampling.py)."""
        mask, mode = rows["target_mask"], self.grpo.importance_sampling_mode
        if not self.grpo.importance_sampling_correction:
            return grpo_sampling.sampling_metrics(sampler_logps, policy, mask)
        weights = grpo_sampling.correction_weights(
            sampler_logps,
            policy,
            mask,
            mode,
            self.grpo.importance_sampling_clip_min,
            self.grpo.importance_sampling_clip_max,
        )
        rows[grpo_sampling.IS_RATIO_KEY] = weights
        return grpo_sampling.sampling_metrics(sampler_logps, policy, mask, weights, mode)

    def _rows(self, sampled: Sampled) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """The rows of the module docstring, and the sampler's log-probs laid out as target_ids."""
        shape = (len(sampled.prompts), self.seq_len)
        rows = {
            "input_ids": np.full(shape, self.pad_id, np.int32),
            "target_ids": np.full(shape, self.pad_id, np.int32),
            "target_mask": np.zeros(shape, bool),
            "positions": np.zeros(shape, np.int32),
            "segment_ids": np.zeros(shape, np.int32),
        }
        sampler_logps = np.zeros(shape, np.float32)
        for row, (prompt, tokens, logps) in enumerate(
            zip(sampled.prompts, sampled.out.tokens, sampled.out.logps, strict=True)
        ):
            sequence = [*prompt.ids, *tokens]
            length, start = len(sequence) - 1, len(prompt.ids) - 1
            rows["input_ids"][row, :length] = sequence[:-1]
            rows["target_ids"][row, :length] = sequence[1:]
            rows["positions"][row, :length] = np.arange(length)
            rows["segment_ids"][row, :length] = 1
            rows["target_mask"][row, start:length] = True
            sampler_logps[row, start:length] = logps
        return rows, sampler_logps

    def local(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """This process's share of global rows (sharding.row_feed)."""
        mesh = next(iter(self.steps.batch_shardings.values())).mesh
        block, blocks = row_feed(mesh)
        share = self.rows // blocks
        return {key: value[block * share : (block + 1) * share] for key, value in rows.items()}

    # --- Metrics and the completions log ---------------------------------------------------

    def _metrics(self, sampled, total, more, times) -> dict[str, float]:
        """TRL's names, under train/ (more: the gate's and the objective's)."""
        lengths = np.array([len(t) for t in sampled.out.tokens])
        stopped = np.array([s == "stop" for s in sampled.out.stop_reasons])
        values = {
            "reward": np.nanmean(total) if not np.all(np.isnan(total)) else None,
            "completions/mean_length": lengths.mean(),
            "completions/min_length": lengths.min(),
            "completions/max_length": lengths.max(),
            "completions/clipped_ratio": 1.0 - stopped.mean(),
            "num_tokens": self.tokens_seen,
        }
        if stopped.any():
            values |= {
                "completions/mean_terminated_length": lengths[stopped].mean(),
                "completions/min_terminated_length": lengths[stopped].min(),
                "completions/max_terminated_length": lengths[stopped].max(),
            }
        for column, reward in enumerate(self.rewards):
            scores = sampled.table[:, column]
            values[f"rewards/{reward.name}/mean"] = _nanmean(scores)
            values[f"rewards/{reward.name}/std"] = _finite_or_none(grpo.nanstd(scores))
        values |= more
        values |= times
        values["sampled_tokens_per_sec"] = lengths.sum() / max(times["time/sampling_s"], 1e-9)
        return {f"train/{k}": float(v) for k, v in values.items() if v is not None}

    def _log_completions(self, step, chosen, sampled: Sampled, advantages) -> None:
        g = self.grpo.num_generations
        with open(self.workdir / COMPLETIONS_FILE, "a", encoding="utf-8") as f:
            for row, text in enumerate(sampled.texts):
                index, prompt = chosen[row // g]
                record = {
                    "step": step,
                    "prompt_index": index,
                    "where": prompt.where,
                    "prompt": prompt.prompt,
                    "completion": text,
                    "completion_ids": sampled.out.tokens[row],
                    "rewards": {
                        r.name: _finite_or_none(sampled.table[row, c])
                        for c, r in enumerate(self.rewards)
                    },
                    "advantage": float(advantages[row]),
                    "logps": [round(float(x), 6) for x in sampled.out.logps[row]],
                    "stop_reason": sampled.out.stop_reasons[row],
                }
                f.write(json.dumps(record, ensure_ascii=False) + "\n")

    # --- num_iterations > 1: a rollout's rows survive a restart inside it ---------------------

    def _rollout_file(self, number: int) -> Path:
        return self.workdir / ROLLOUTS_DIR / f"{number:08d}.{jax.process_index()}.npz"

    def _write_rollout(self, number: int, rows: dict[str, np.ndarray]) -> None:
        path = self._rollout_file(number)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial.npz")
        np.savez(partial, **rows)
        partial.replace(path)
        for old in path.parent.glob(f"*.{jax.process_index()}.npz"):
            if int(old.name.split(".")[0]) < number - 1:
                old.unlink()

    def _read_rollout(self, number: int) -> dict[str, np.ndarray]:
        path = self._rollout_file(number)
        if not path.exists():
            raise ConfigError(
                f"resuming inside rollout {number} (grpo.num_iterations="
                f"{self.grpo.num_iterations}) needs its rows, {path}, which is gone; the run "
                "cannot continue exactly. Start a new WORKDIR with checkpoint.init_from."
            )
        with np.load(path) as saved:
            return {key: saved[key] for key in saved.files}

    # --- Eval: held-out prompts, by sampling -------------------------------------------------

    def evaluate(self, model: Any) -> dict[str, Any]:
        """Greedy replies to the held-out prompts (eval/reward, eval/pass@1) and, with
        grpo.eval_samples = k, k samples each at the sampling settings (eval/pass@k). The first
        reward function is the verifier: a reply passes where it scores 1.0 or more there."""
        self.check_memory(model)
        held_out, batch = self.prompts.eval, max(self.config.eval.global_batch_size, 1)
        greedy = [
            self.sample(model, held_out[i : i + batch], 1, greedy=True, seed=0)
            for i in range(0, len(held_out), batch)
        ]
        table = np.concatenate([s.table for s in greedy])
        total = grpo.total_rewards(table, self.weights)
        passed = table[:, 0] >= 1.0
        metrics: dict[str, Any] = {
            "eval/reward": _nanmean(total) or 0.0,
            "eval/pass@1": float(passed.mean()),
            "eval/completions/mean_length": float(
                np.mean([len(t) for s in greedy for t in s.out.tokens])
            ),
        }
        for column, reward in enumerate(self.rewards):
            mean = _nanmean(table[:, column])
            if mean is not None:
                metrics[f"eval/rewards/{reward.name}/mean"] = mean
        k = self.grpo.eval_samples
        if k:
            per_batch = max(batch // k, 1)
            any_pass = []
            for i in range(0, len(held_out), per_batch):
                s = self.sample(
                    model, held_out[i : i + per_batch], k, greedy=False, seed=EVAL_SEED + i
                )
                any_pass += list((s.table[:, 0] >= 1.0).reshape(-1, k).any(axis=1))
            metrics["eval/pass@k"] = float(np.mean(any_pass))
        metrics["eval/samples"] = self._samples(greedy)
        return metrics

    def _samples(self, greedy: list[Sampled]) -> str:
        shown, out = self.config.eval.show_samples, []
        rows = [
            (p, t, r) for s in greedy for p, t, r in zip(s.prompts, s.texts, s.table, strict=True)
        ]
        for index, (prompt, text, scores) in enumerate(rows[:shown]):
            named = ", ".join(
                f"{r.name} {_finite_or_none(v)}" for r, v in zip(self.rewards, scores, strict=True)
            )
            question = self.tokenizer.decode(list(prompt.ids), skip_special_tokens=False)
            out.append(
                f"--- sample {index} ({named})\n{question.strip()}\n>>> model: {text.strip()}"
            )
        return "\n".join(out)


def _nanmean(x: np.ndarray) -> float | None:
    x = np.asarray(x, np.float64)
    return None if np.all(np.isnan(x)) else float(np.nanmean(x))


def _finite_or_none(value: float) -> float | None:
    return None if np.isnan(value) else float(value)


def _drop_after(path: Path, index: int) -> None:
    """Keeps the completions of updates 1 .. index (a resume samples the later ones again),
    and drops a line a kill cut short."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        try:
            if json.loads(line)["step"] <= index and line.endswith("\n"):
                kept.append(line)
        except json.JSONDecodeError:
            continue  # the last line, torn by a kill: its update runs again
    partial = path.with_suffix(".partial")
    partial.write_text("".join(kept), encoding="utf-8")
    partial.replace(path)
