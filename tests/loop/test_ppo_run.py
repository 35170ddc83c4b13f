"""PPO as a run (config.train.objective = "ppo"): rollouts as GRPO's, a value head on the
policy's trunk trained beside it, TRL's PPO metrics, an exact resume (the value head is in the
checkpoint) and an export transformers loads as the plain causal LM."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from test_grpo_run import (
    assert_same_run,
    grpo_config,
    records,
    run,
    train_metrics,
)
from transformers import AutoModelForCausalLM

from sft_jax.core.errors import ConfigError
from sft_jax.core.spec import RunSpec
from sft_jax.loop import export, rollouts
from sft_jax.train.config_check import check_values


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory):
    from chat_tokenizers import make_tokenizer
    from hf_models import save_tiny_llama

    path = tmp_path_factory.mktemp("ppo_llama")
    save_tiny_llama(path, make_tokenizer("chatml"))
    return path


def ppo_config(model_dir: Path, data: Path, steps: int):
    config = grpo_config(model_dir, data, steps=steps, num_generations=2)
    config.train.objective = "ppo"
    config.ppo.kl_coef = 0.1
    config.ppo.vf_coef = 0.5
    return config


@pytest.mark.e2e
def test_a_ppo_run_trains_its_critic_resumes_exactly_and_exports_the_policy(
    chat_model_dir, tmp_path
):
    config = ppo_config(chat_model_dir, tmp_path, steps=3)
    config.train.lr_schedule = "constant"
    config.checkpoint.enabled = True
    config.checkpoint.every_steps = 1
    config.checkpoint.async_save = False
    run(config, tmp_path / "whole")
    steps = train_metrics(tmp_path / "whole")
    assert [m["step"] for m in steps] == [1, 2, 3]
    for name in (
        "objective/kl",
        "objective/scores",
        "objective/rlhf_reward",
        "val/mean",
        "loss/policy_avg",
        "loss/value_avg",
        "val/vpred",
        "val/clipfrac_avg",
        "policy/clipfrac_avg",
        "reward",
        "sampling/sampling_logp_difference/max",
    ):
        assert f"train/{name}" in steps[0], name
    # The critic starts at 0 everywhere (a zero head) and learns from the returns.
    assert steps[0]["train/val/mean"] == 0.0 and steps[0]["train/loss/value_avg"] > 0
    assert steps[-1]["train/val/mean"] != 0.0
    # The first update trains on the policy that sampled: the KL to itself is 0.
    assert steps[0]["train/objective/kl"] == pytest.approx(0.0, abs=1e-5)
    lines = records(tmp_path / "whole" / rollouts.COMPLETIONS_FILE)
    assert len(lines) == 3 * config.train.global_batch_size
    assert all(np.isfinite(line["advantage"]) for line in lines)

    config.train.steps = 2
    run(config, tmp_path / "parts")
    config.train.steps = 3
    run(config, tmp_path / "parts")
    assert_same_run(tmp_path / "parts", tmp_path / "whole")

    out = export.export_run(tmp_path / "whole", which="last")
    reloaded = AutoModelForCausalLM.from_pretrained(out)  # no value head in a causal LM
    ids = torch.tensor([[1, 5, 9, 3]])
    assert torch.isfinite(reloaded(input_ids=ids).logits).all()


def reward_model(path: Path) -> Path:
    """A tiny reward model's export (LlamaForSequenceClassification) on the policy's tokenizer."""
    import transformers
    from chat_tokenizers import make_tokenizer

    tokenizer = make_tokenizer("chatml")
    tokenizer.save_pretrained(path)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    transformers.LlamaForSequenceClassification(config).save_pretrained(path)
    return path


@pytest.mark.e2e
def test_classic_rlhf_a_reward_model_scores_and_a_copy_of_it_is_the_critic(
    chat_model_dir, tmp_path
):
    """TRL's recipe: the reward model's export scores the completions and a copy of it, trained
    in full, is the critic (ppo.value_model), beside a LoRA policy; the export holds the policy
    alone."""
    config = ppo_config(chat_model_dir, tmp_path, steps=2)
    config.grpo.reward_funcs = f"reward_model:{reward_model(tmp_path / 'rm')}"
    config.grpo.reward_weights = ""
    config.ppo.value_model = "reward_model"
    config.lora.rank = 4
    config.checkpoint.enabled = True
    config.checkpoint.async_save = False
    run(config, tmp_path / "run")
    steps = train_metrics(tmp_path / "run")
    assert [m["step"] for m in steps] == [1, 2]
    # The critic starts as the reward model: its values are its scores, not a zero head's.
    assert steps[0]["train/val/mean"] != 0.0 and steps[0]["train/objective/scores"] != 0.0
    assert all(np.isfinite(m["train/loss/value_avg"]) for m in steps)
    out = export.export_run(tmp_path / "run", which="last")
    with safe_open(str(next(Path(out).glob("*.safetensors"))), "np") as f:
        names = list(f.keys())
    assert not [n for n in names if "critic" in n or "value" in n or "score" in n]
    AutoModelForCausalLM.from_pretrained(out)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"ppo.lam": 1.5}, "ppo.lam"),
        ({"ppo.vf_coef": 0.0}, "ppo.vf_coef"),
        ({"ppo.value_model": "reward_model"}, "grpo.reward_funcs, which names 0"),
        ({"ppo.value_model": "/no/such/export"}, "no config.json there"),
        ({"grpo.reward_funcs": "no_such_module:f", "grpo.reward_weights": ""}, "does not import"),
        (
            {"lora.rank": 4, "lora.trainable_modules": "lm_head"},
            "with ppo.kl_coef > 0 the reference is the model with its adapters off",
        ),
    ],
)
def test_bad_ppo_configs_are_refused_naming_the_field(chat_model_dir, tmp_path, change, message):
    spec = RunSpec.of(ppo_config(chat_model_dir, tmp_path, steps=1)).with_values(change)
    with pytest.raises(ConfigError, match=message):
        check_values(spec, 8, 8)
