"""What every objective owes the loop: a mixture of experts' load-balancing loss (preference and
reward objectives, against transformers), FLOPs per token for MFU (a reference forward), and the
config fields a resume refuses to change (the objective, DPO's reference)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from hf_models import save_hf_model
from test_preference import make_pairs, pair_batch

from configs import base
from sft_jax.models import from_pretrained
from sft_jax.objectives.moe import RouterLosses
from sft_jax.objectives.preference import PairObjective, PreferenceSpec
from sft_jax.objectives.reward import RewardObjective
from sft_jax.train.flops import matmul_params, training_flops_per_token
from sft_jax.workdir.compatibility import config_changes


def hf_aux_loss(hf_model, pairs) -> float:
    """transformers' aux_loss over every chosen and rejected sequence, right-padded."""
    sequences = [tokens for pair in pairs for tokens, _ in pair]
    width = max(len(s) for s in sequences)
    ids, mask = np.zeros((len(sequences), width), np.int64), np.zeros((len(sequences), width))
    for row, tokens in enumerate(sequences):
        ids[row, : len(tokens)], mask[row, : len(tokens)] = tokens, 1
    with torch.no_grad():
        out = hf_model(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                       output_router_logits=True)  # fmt: skip
    return out.aux_loss.item()


@pytest.mark.parametrize("objective_name", ["orpo", "reward"])
def test_a_preference_objective_on_moe_adds_the_load_balancing_loss(tmp_path, objective_name):
    """loss(aux_loss_coef = c) - loss(0) = c x transformers' aux_loss over the pairs' sequences
    (two pairs packed in a row, padding after them), and its gradient reaches the router."""
    hf_model = save_hf_model("qwen3_moe", tmp_path)
    score_labels = 1 if objective_name == "reward" else None
    model = from_pretrained(tmp_path, score_labels=score_labels)
    pairs = make_pairs(seed=5, count=4)
    batch = {k: jnp.asarray(v) for k, v in pair_batch(pairs, 2).items()}
    graphdef, params = nnx.split(model)

    def objective(coef: float):  # the router's losses wrap the pair objective, as in a run
        if objective_name == "reward":
            return RouterLosses(RewardObjective(0, max_pairs=2), model.config.moe_layers, coef)
        pairs = PairObjective(PreferenceSpec("orpo", beta=0.1), "none", 2)
        return RouterLosses(pairs, model.config.moe_layers, coef)

    def loss_and_sums(params, coef):
        chosen = objective(coef)
        sums = chosen.sums(nnx.merge(graphdef, params), batch)
        return chosen.loss(sums, chosen.normalizer(batch)), sums

    value_and_grad = jax.jit(jax.value_and_grad(loss_and_sums, has_aux=True), static_argnums=1)
    (with_aux, sums), grads = value_and_grad(params, 0.1)
    without, _ = jax.jit(loss_and_sums, static_argnums=1)(params, 0.0)
    expected = hf_aux_loss(hf_model, pairs)
    np.testing.assert_allclose(float(sums.aux), expected, rtol=1e-5)
    np.testing.assert_allclose(float(with_aux - without), 0.1 * expected, rtol=1e-4)
    metrics = objective(0.1).metrics(sums, objective(0.1).normalizer(batch))
    np.testing.assert_allclose(float(metrics["train/aux_loss"]), expected, rtol=1e-5)
    router = [g for path, g in nnx.to_flat_state(grads) if "router" in path]
    assert router and all(float(jnp.abs(g[...]).sum()) > 0 for g in router)


def test_mfu_counts_the_reference_forward_and_the_score_head():
    from dataclasses import replace

    from sft_jax.models.config import from_hf_config
    from sft_jax.models.io.hf import load_hf_config

    config = from_hf_config(load_hf_config(base.ASSETS / "demo_model"))
    seq_len, n = 256, matmul_params(config)
    attention_forward = 2 * config.num_layers * seq_len * config.num_heads * config.head_dim
    sft = training_flops_per_token(config, seq_len)
    dpo = training_flops_per_token(config, seq_len, reference_forwards=1)
    assert dpo - sft == pytest.approx(2 * n + attention_forward)
    lora = training_flops_per_token(config, seq_len, 1000)
    assert training_flops_per_token(config, seq_len, 1000, 1) - lora == pytest.approx(dpo - sft)
    reward = replace(config, score_labels=1)
    assert n - matmul_params(reward) == (config.vocab_size - 1) * config.hidden_size
    spec = PreferenceSpec()
    assert PairObjective(spec, "adapters_off").reference_forwards == 1
    assert PairObjective(spec, "none").reference_forwards == 0


def test_a_resume_refuses_another_objective_or_reference():
    saved = base.get_config()
    now = base.get_config()
    now.train.objective, now.preference.reference = "dpo", "adapters_off"
    changes = config_changes(saved.to_json(), now)
    assert "train.objective: 'sft' -> 'dpo'" in changes
    assert "preference.reference: 'auto' -> 'adapters_off'" in changes
    # A checkpoint saved before the fields existed was an SFT run with the default reference.
    old = json.loads(saved.to_json())
    del old["train"]["objective"], old["preference"]
    assert config_changes(json.dumps(old), base.get_config()) == []
