"""Online RL runs end to end (loop/rollouts.py): rollouts from the live params on 8 fake
devices, TRL's metrics, the completions log, exact resume, the numerics gate, bad input."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_trainer import base_config

from sft_jax.core.errors import ConfigError
from sft_jax.core.spec import RunSpec
from sft_jax.data.prompts import load_prompts
from sft_jax.data.records import DataError
from sft_jax.loop import rollouts, trainer
from sft_jax.objectives.grpo_sampling import SamplerDivergedError
from sft_jax.objectives.rewards import RewardError
from sft_jax.train import memory as memory_plan
from sft_jax.train.config_check import check_values
from sft_jax.train.setup import open_run_data

G = 4


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory):
    from chat_tokenizers import make_tokenizer
    from hf_models import save_tiny_llama

    path = tmp_path_factory.mktemp("grpo_llama")
    save_tiny_llama(path, make_tokenizer("chatml"))
    return path


def write_prompts(path: Path, count: int, seed: int, words: int = 3) -> Path:
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for _ in range(count):
            a, b = (int(x) for x in rng.integers(0, 50, 2))
            text = " ".join(["add"] * (words - 2) + [str(a), str(b)])
            record = {"prompt": [{"role": "user", "content": text}], "answer": str(a + b)}
            f.write(json.dumps(record) + "\n")
    return path


def grpo_config(model_dir: Path, data: Path, steps: int = 3, **grpo):
    config = base_config(model_dir, steps=steps, warmup_steps=0, learning_rate=1e-2)
    config.train.objective = "grpo"
    config.data.train_files = str(write_prompts(data / "train.jsonl", 16, 0))
    config.data.eval_files = str(write_prompts(data / "eval.jsonl", 4, 1))
    config.grpo.num_generations = G
    config.grpo.max_prompt_length = 32
    config.grpo.max_completion_length = 6
    config.grpo.reward_funcs = "grpo_rewards:even_tokens,grpo_rewards:needs_answer"
    config.grpo.reward_weights = "1.0,0.5"
    config.grpo.eval_samples = 2
    config.eval.every_steps = 0
    config.eval.at_start = False
    for key, value in grpo.items():
        config.grpo[key] = value
    return config


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_metrics(workdir: Path) -> list[dict]:
    return [r for r in records(workdir / "metrics.jsonl") if "train/loss" in r]


def assert_same_run(resumed: Path, whole: Path) -> None:
    """Every update's loss, gradient norm and reward, and every completion, bitwise equal."""
    for name in ("train/loss", "train/grad_norm", "train/reward"):
        assert [m.get(name) for m in train_metrics(resumed)] == [
            m.get(name) for m in train_metrics(whole)
        ], name
    completions = rollouts.COMPLETIONS_FILE
    assert records(resumed / completions) == records(whole / completions)


def run(config, workdir: Path) -> dict:
    return trainer.run(RunSpec.of(config), workdir, data_factory=open_run_data)


@pytest.mark.e2e
def test_a_grpo_run_logs_trl_metrics_and_every_completion(chat_model_dir, tmp_path):
    config = grpo_config(chat_model_dir, tmp_path, steps=3)
    config.eval.every_steps = 3
    summary = run(config, tmp_path / "run")
    steps = train_metrics(tmp_path / "run")
    assert [m["step"] for m in steps] == [1, 2, 3]
    for name in (
        "reward", "reward_std", "frac_reward_zero_std", "kl", "entropy",
        "rewards/grpo_rewards:even_tokens/mean", "rewards/grpo_rewards:needs_answer/std",
        "clip_ratio/region_mean",
        "completions/mean_length", "completions/clipped_ratio", "num_tokens",
        "sampling/sampling_logp_difference/max", "time/sampling_s", "sampled_tokens_per_sec",
    ):  # fmt: skip
        assert f"train/{name}" in steps[0], name
    # The sampler's log-probs are the training forward's on the same tokens and params: the
    # rows put every completion token where the loss reads it.
    assert max(m["train/sampling/sampling_logp_difference/max"] for m in steps) < 1e-4
    assert steps[-1]["train/num_tokens"] > steps[0]["train/num_tokens"]
    assert any(m["train/loss"] != 0.0 for m in steps)
    # One line per completion: 2 prompts x G per update.
    lines = records(tmp_path / "run" / rollouts.COMPLETIONS_FILE)
    assert len(lines) == 3 * config.train.global_batch_size
    first = lines[0]
    assert set(first) >= {"step", "prompt_index", "prompt", "completion", "completion_ids",
                          "rewards", "advantage", "logps", "stop_reason"}  # fmt: skip
    assert len(first["logps"]) == len(first["completion_ids"]) <= 6
    even = sum(t % 2 == 0 for t in first["completion_ids"]) / len(first["completion_ids"])
    assert first["rewards"]["grpo_rewards:even_tokens"] == pytest.approx(even)
    for group in range(0, len(lines), G):  # advantages are centred in each group
        assert abs(sum(r["advantage"] for r in lines[group : group + G])) < 1e-3
    final = summary["final_eval"]
    assert {"eval/reward", "eval/pass@1", "eval/pass@k", "eval/samples"} <= set(final)
    assert 0.0 <= final["eval/pass@1"] <= 1.0 and 0.0 <= final["eval/pass@k"] <= 1.0


@pytest.mark.e2e
@pytest.mark.parametrize("num_iterations", [1, 2])
def test_a_resumed_grpo_run_samples_and_trains_as_an_uninterrupted_one(
    chat_model_dir, tmp_path, num_iterations
):
    config = grpo_config(chat_model_dir, tmp_path, steps=4, num_iterations=num_iterations)
    config.train.lr_schedule = "constant"  # the same updates whatever train.steps says
    config.checkpoint.enabled = True
    config.checkpoint.every_steps = 1
    config.checkpoint.async_save = False
    run(config, tmp_path / "whole")
    config.train.steps = 3  # stops inside rollout 1 when num_iterations = 2
    run(config, tmp_path / "parts")
    config.train.steps = 4
    run(config, tmp_path / "parts")
    assert_same_run(tmp_path / "parts", tmp_path / "whole")


@pytest.mark.e2e
def test_the_numerics_gate_stops_a_sampler_that_disagrees_with_the_trainer(
    chat_model_dir, tmp_path, monkeypatch
):
    real = rollouts.rollout

    def perturbed(*args, **kwargs):
        out = real(*args, **kwargs)
        return out.__class__(out.tokens, [lp + 0.2 for lp in out.logps], out.stop_reasons)

    monkeypatch.setattr(rollouts, "rollout", perturbed)
    config = grpo_config(chat_model_dir, tmp_path, steps=2, max_sampling_logp_difference=0.1)
    with pytest.raises(SamplerDivergedError, match=r"step 1: .* by up to 0\.2"):
        run(config, tmp_path / "run")


@pytest.mark.e2e
def test_the_sampler_correction_weights_a_mismatched_sampler(chat_model_dir, tmp_path, monkeypatch):
    """With the gate off and TRL's token_truncate correction, a sampler 0.2 above the trainer
    trains with every completion token's loss weighted exp(-0.2), as TRL logs it."""
    real = rollouts.rollout

    def perturbed(*args, **kwargs):
        out = real(*args, **kwargs)
        return out.__class__(out.tokens, [lp + 0.2 for lp in out.logps], out.stop_reasons)

    monkeypatch.setattr(rollouts, "rollout", perturbed)
    config = grpo_config(
        chat_model_dir,
        tmp_path,
        steps=1,
        max_sampling_logp_difference=0.0,
        importance_sampling_correction=True,
        importance_sampling_mode="token_truncate",
    )
    run(config, tmp_path / "run")
    (step,) = train_metrics(tmp_path / "run")
    for name in ("min", "mean", "max"):
        ratio = step[f"train/sampling/importance_sampling_ratio/{name}"]
        assert ratio == pytest.approx(np.exp(-0.2), abs=1e-4)
    assert step["train/sampling/sampling_logp_difference/mean"] == pytest.approx(0.2, abs=1e-4)


def spec_of(config) -> RunSpec:
    return RunSpec.of(config)


def test_long_prompts_are_counted_skips_or_an_error_naming_the_line(chat_model_dir, tmp_path):
    from sft_jax.data.pipeline import run_tokenizer

    config = grpo_config(chat_model_dir, tmp_path)
    long = write_prompts(tmp_path / "long.jsonl", 2, 5, words=40)
    config.data.train_files = f"{config.data.train_files},{long}"
    tokenizer = run_tokenizer(spec_of(config))
    loaded = load_prompts(spec_of(config), tokenizer)
    assert len(loaded.train) == 16 and loaded.skipped == {"long_prompt": 2}
    config.grpo.long_prompts = "error"
    with pytest.raises(DataError, match=r"long\.jsonl:1: the prompt has \d+ tokens"):
        load_prompts(spec_of(config), tokenizer)


@pytest.mark.parametrize(
    "change, error, message",
    [
        (
            {"grpo.reward_funcs": "no_such_module:f", "grpo.reward_weights": ""},
            ConfigError,
            "module 'no_such_module' does not import",
        ),
        ({"grpo.num_generations": 1}, ConfigError, "group of one completion has no std"),
        ({"train.global_batch_size": 8, "grpo.num_generations": 3}, ConfigError, "multiple of"),
        ({"grpo.loss_type": "ppo"}, ConfigError, "expected one of dapo"),
        ({"grpo.importance_sampling_mode": "tis"}, ConfigError, "expected one of token_trunc"),
        (
            {"grpo.importance_sampling_clip_max": 0.5, "grpo.importance_sampling_clip_min": 1.0},
            ConfigError,
            "importance_sampling_clip_max",
        ),
        ({"preference.reference_model": "/sft"}, ConfigError, "only train.objective='dpo'"),
        (
            {"grpo.beta": 0.04, "lora.rank": 4, "lora.trainable_modules": "lm_head"},
            ConfigError,
            r"config\.lora\.trainable_modules='lm_head': with grpo\.beta > 0 the reference is "
            r"the model with its adapters off.* or set grpo\.beta=0",
        ),
    ],
)
def test_bad_grpo_configs_are_refused_naming_the_field(
    chat_model_dir, tmp_path, change, error, message
):
    spec = spec_of(grpo_config(chat_model_dir, tmp_path)).with_values(change)
    with pytest.raises(error, match=message):
        check_values(spec, 8, 8)


@pytest.mark.e2e
def test_a_reward_that_returns_nan_stops_the_run_naming_it(chat_model_dir, tmp_path):
    config = grpo_config(chat_model_dir, tmp_path, reward_funcs="grpo_rewards:not_a_number")
    config.grpo.reward_weights = ""
    with pytest.raises(RewardError, match=r"grpo_rewards:not_a_number.* returned nan"):
        run(config, tmp_path / "run")


WORKER = Path(__file__).parents[1] / "grpo_worker.py"


def start_worker(model_dir: Path, data: Path, workdir: Path, steps: int, num_iterations: int):
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu"
    )
    arguments = [str(model_dir), str(data), str(workdir), str(steps), str(num_iterations)]
    return subprocess.Popen(
        [sys.executable, str(WORKER), *arguments],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


@pytest.mark.e2e
def test_kill_9_at_a_random_update_then_resume_samples_and_trains_as_uninterrupted(
    chat_model_dir, tmp_path
):
    """Inside a rollout (num_iterations 2), with checkpoints saved in the background: the
    completions and every update's loss, gradient norm and reward equal an uninterrupted run's."""
    from test_resume import finish, kill_9_at

    steps, data = 10, tmp_path / "data"
    data.mkdir()
    finish(start_worker(chat_model_dir, data, tmp_path / "whole", steps, 2))
    kill_at = random.Random(os.getpid()).randint(3, steps - 3)
    parts = tmp_path / "parts"
    kill_9_at(parts, kill_at, start_worker(chat_model_dir, data, parts, steps, 2))
    summary = finish(start_worker(chat_model_dir, data, parts, steps, 2))
    assert summary["start_step"] >= 2, "a checkpoint should have been there to resume from"
    assert_same_run(parts, tmp_path / "whole")


@pytest.mark.e2e
def test_a_rollout_that_cannot_fit_is_refused_before_sampling(
    chat_model_dir, tmp_path, monkeypatch
):
    config = grpo_config(chat_model_dir, tmp_path, steps=2)
    monkeypatch.setattr(memory_plan, "device_bytes_limit", lambda: 1 << 20)  # 1 MiB devices
    with pytest.raises(ConfigError, match=r"sampling 8 rows x \(32 prompt \+ 6 completion\)"):
        run(config, tmp_path / "run")
    assert not (tmp_path / "run" / rollouts.COMPLETIONS_FILE).exists()
