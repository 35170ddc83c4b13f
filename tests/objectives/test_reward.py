"""Reward models: the score head against transformers' LlamaForSequenceClassification (padded and
packed rows, and the export loaded back by AutoModelForSequenceClassification), the
Bradley-Terry loss and its gradients against PyTorch and TRL's RewardTrainer.compute_loss."""

from __future__ import annotations

import collections
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from flax import nnx
from hf_models import save_hf_model
from test_preference import pair_batch, small_pair_config

from sft_jax.core.spec import RunSpec
from sft_jax.models import from_pretrained, save_pretrained
from sft_jax.objectives.reward import MARGIN_KEY, RewardObjective, pair_rewards
from sft_jax.train import sharding

PAD = 0  # the tiny models' pad_token_id; every sequence ends with it (pad = eos, as in the demo)
SEQ_LEN = 48


def make_pairs(seed: int = 0, count: int = 6):
    """(tokens, trained) of chosen and rejected: a shared prompt, two replies, a final pad id."""
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(count):
        prompt = rng.integers(3, 128, size=rng.integers(2, 5))
        replies = [np.r_[rng.integers(3, 128, size=rng.integers(1, 5)), PAD] for _ in range(2)]
        pairs.append(tuple((np.r_[prompt, r], np.r_[0 * prompt, 0 * r + 1] > 0) for r in replies))
    return pairs


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory):
    """A tiny causal Llama turned into a transformers reward model (random score head)."""
    causal = tmp_path_factory.mktemp("causal")
    save_hf_model("llama3.1", causal)
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(causal, num_labels=1)
    with torch.no_grad():
        model.score.weight.normal_(0, 1.0)  # large enough that every hidden unit shows
    path = tmp_path_factory.mktemp("reward")
    model.save_pretrained(path)
    return causal, path


def torch_rewards(model, pairs) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' rewards of chosen and rejected, right-padded in one batch."""
    sequences = [tokens for pair in pairs for tokens, _ in pair]
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, tokens in enumerate(sequences):
        ids[row, : len(tokens)], mask[row, : len(tokens)] = torch.as_tensor(tokens), 1
    rewards = model(input_ids=ids, attention_mask=mask).logits[:, 0]
    return rewards[0::2], rewards[1::2]


def jax_rewards(model, pairs, per_row: int):
    batch = {k: jnp.asarray(v) for k, v in pair_batch(pairs, per_row).items()}
    hidden = model.hidden_states(batch["input_ids"], batch["positions"], batch["segment_ids"])
    rewards = pair_rewards(model.scores(hidden)[..., 0], batch, per_row, PAD)
    valid = np.asarray(rewards.valid)
    return np.asarray(rewards.chosen)[valid], np.asarray(rewards.rejected)[valid]


@pytest.mark.parametrize("per_row", [1, 2])
def test_scores_equal_transformers_padded_and_packed(reward_dir, per_row):
    _, path = reward_dir
    pairs = make_pairs()
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(path).eval()
    with torch.no_grad():
        chosen, rejected = (r.numpy() for r in torch_rewards(hf, pairs))
    model = from_pretrained(path, mesh=sharding.single_device_mesh())
    assert model.config.score_labels == 1 and model.lm_head is None
    ours = jax_rewards(model, pairs, per_row)
    np.testing.assert_allclose(ours[0], chosen, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ours[1], rejected, rtol=1e-4, atol=1e-5)


def test_export_loads_in_transformers_with_the_same_scores(reward_dir, tmp_path):
    """A causal LM loaded as a reward model (new score head), changed, exported: transformers'
    AutoModelForSequenceClassification loads it as is and scores as we do."""
    causal, _ = reward_dir
    model = from_pretrained(causal, mesh=sharding.single_device_mesh(), score_labels=1)
    model.score[...] = jax.random.normal(jax.random.key(3), model.score[...].shape)
    save_pretrained(model, tmp_path / "export")
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "export")
    config = hf.config
    assert config.architectures == ["LlamaForSequenceClassification"]
    assert config.num_labels == 1 and config.pad_token_id == PAD
    pairs = make_pairs(seed=1)
    with torch.no_grad():
        chosen, rejected = (r.numpy() for r in torch_rewards(hf.eval(), pairs))
    ours = jax_rewards(model, pairs, per_row=2)
    np.testing.assert_allclose(ours[0], chosen, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ours[1], rejected, rtol=1e-4, atol=1e-5)


def with_margins(batch, margins, per_row: int):
    """The batch with each pair's margin at its chosen reply's segment (core/batch.py)."""
    out = np.zeros(batch["input_ids"].shape, np.float32)
    for index, margin in enumerate(margins):
        row, slot = divmod(index, per_row)
        out[row, 2 * slot] = margin  # segment 2 * slot + 1
    return batch | {MARGIN_KEY: out}


@pytest.mark.parametrize("center", [0.0, 0.3])
def test_loss_and_gradients_equal_pytorch_and_trl(reward_dir, center):
    _, path = reward_dir
    pairs, margins = make_pairs(seed=2), np.linspace(-0.5, 1.0, 6).astype(np.float32)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(path).train()
    chosen, rejected = torch_rewards(hf, pairs)
    margin = torch.as_tensor(margins)
    expected = -F.logsigmoid(chosen - rejected - margin).mean()
    expected = expected + center * torch.mean((chosen + rejected) ** 2)
    expected.backward()
    grad_norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in hf.parameters())).item()

    model = from_pretrained(path, mesh=sharding.single_device_mesh())
    objective = RewardObjective(PAD, max_pairs=2, center_rewards_coefficient=center)
    batch = {k: jnp.asarray(v) for k, v in with_margins(pair_batch(pairs, 2), margins, 2).items()}
    graphdef, params = nnx.split(model)

    def loss_of(params):
        sums = objective.sums(nnx.merge(graphdef, params), batch)
        return objective.loss(sums, objective.normalizer(batch)), sums

    (loss, sums), grads = jax.value_and_grad(loss_of, has_aux=True)(params)
    np.testing.assert_allclose(float(loss), expected.item(), rtol=1e-5)
    norm = float(jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(grads))))
    np.testing.assert_allclose(norm, grad_norm, rtol=1e-4)
    metrics = objective.metrics(sums, objective.normalizer(batch))
    difference = (chosen - rejected).detach()
    np.testing.assert_allclose(float(metrics["train/margin"]), difference.mean().item(), rtol=1e-5)
    assert float(metrics["train/accuracy"]) == (difference > 0).float().mean().item()
    every = torch.cat([chosen, rejected]).detach()  # TRL's min_reward / max_reward
    np.testing.assert_allclose(float(metrics["train/min_reward"]), every.min().item(), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["train/max_reward"]), every.max().item(), rtol=1e-5)
    np.testing.assert_allclose(
        trl_reward_loss(hf, pairs, margin, center), expected.item(), rtol=1e-5
    )


def trl_reward_loss(model, pairs, margin, center: float) -> float:
    """TRL's RewardTrainer.compute_loss itself, on a stand-in for the trainer (its metrics
    bookkeeping only), with TRL's batch layout: every chosen sequence, then every rejected."""
    from trl import RewardTrainer

    sequences = [p[0][0] for p in pairs] + [p[1][0] for p in pairs]
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), PAD, dtype=torch.long)
    for row, tokens in enumerate(sequences):
        ids[row, : len(tokens)] = torch.as_tensor(tokens)
    identity = lambda x: x  # noqa: E731
    trainer = types.SimpleNamespace(
        model=model, args=types.SimpleNamespace(center_rewards_coefficient=center or None),
        accelerator=types.SimpleNamespace(gather_for_metrics=identity, gather=identity),
        _total_train_tokens=0, _tp_size=1, _metrics=collections.defaultdict(
            lambda: collections.defaultdict(list)),
    )  # fmt: skip
    inputs = {"input_ids": ids, "attention_mask": (ids != PAD).long(), "margin": margin}
    with torch.no_grad():
        return RewardTrainer.compute_loss(trainer, model, inputs).item()


# --- The demo, short -------------------------------------------------------------------------


def reward_demo_config(**overrides):
    config = small_pair_config("reward_demo")
    config.train.steps, config.eval.every_steps, config.train.global_batch_size = 4, 4, 8
    config.eval.global_batch_size, config.checkpoint.every_steps = 8, 4
    config.export.at_end, config.checkpoint.async_save = "last", False
    config.update_from_flattened_dict(overrides)
    return config


def sequences_of(batches) -> list[np.ndarray]:
    """The documents (segments) of every row of the batches, in order."""
    out = []
    for batch in batches:
        for ids, segments in zip(batch["input_ids"], batch["segment_ids"], strict=True):
            out += [ids[segments == s] for s in range(1, segments.max() + 1)]
    return out


@pytest.mark.e2e
def test_the_reward_demo_trains_and_its_export_scores_the_same_in_transformers(tmp_path):
    """The loop end to end on the demo's pairs (4 updates of 2 micro-batches): TRL's metric
    names, and the export's transformers scores reproduce the run's final eval accuracy,
    margin and extreme rewards over all 200 pairs."""
    import json

    from sft_jax.loop import trainer
    from sft_jax.train.setup import open_run_data

    config = reward_demo_config(
        **{"train.gradient_accumulation_steps": 2, "train.global_batch_size": 16}
    )
    summary = trainer.run(config, tmp_path, open_run_data)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in records if r.get("step") == 4 and "eval/accuracy" in r][-1]
    train = records[-2] | records[-1]
    assert final["eval/pairs"] == 200 and "train/accuracy" in train
    assert -1e3 < train["train/min_reward"] < train["train/mean_reward"] < train["train/max_reward"]
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(summary["export"])
    assert hf.config.architectures == ["LlamaForSequenceClassification"]
    sequences = sequences_of(open_run_data(RunSpec.of(config)).eval_batches())
    pairs = [((sequences[i], None), (sequences[i + 1], None)) for i in range(0, 400, 2)]
    with torch.no_grad():
        chosen, rejected = torch_rewards(hf.eval(), pairs)
    difference = (chosen - rejected).numpy()
    np.testing.assert_allclose(final["eval/margin"], difference.mean(), rtol=1e-4, atol=1e-6)
    assert final["eval/accuracy"] == pytest.approx((difference > 0).mean())
    every = torch.cat([chosen, rejected]).numpy()  # the extremes over every eval batch
    np.testing.assert_allclose(final["eval/min_reward"], every.min(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(final["eval/max_reward"], every.max(), rtol=1e-4, atol=1e-6)


# --- LoRA: adapters on the body, the score head trained in full -----------------------------


def test_lora_reward_model_trains_the_head_and_loads_in_peft_and_merged(reward_dir, tmp_path):
    """Under LoRA the new score head trains in full (PEFT's modules_to_save=["score"], as
    task_type SEQ_CLS sets it): the trainable count equals PEFT's, the PEFT adapter loads on
    AutoModelForSequenceClassification and the merged export in transformers, both scoring as
    we do (rel 1e-4)."""
    import peft

    from sft_jax.adapters.lora import (
        LoRASpec,
        apply_lora,
        merged,
        parameter_counts,
        save_adapter,
        trainable_filter,
    )
    from sft_jax.models.decoder import decoder_linears

    causal, _ = reward_dir
    mesh = sharding.single_device_mesh()
    model = from_pretrained(causal, mesh=mesh, score_labels=1)
    spec = LoRASpec(rank=4, alpha=8.0).for_model(model)
    assert spec.extra_trainable == ("score",)
    apply_lora(model, spec, mesh)
    keys = iter(jax.random.split(jax.random.key(5), 100))
    for _, _, linear in decoder_linears(model):  # trained-looking adapters and head
        linear.lora_b[...] = 0.3 * jax.random.normal(next(keys), linear.lora_b[...].shape)
    model.score[...] = jax.random.normal(next(keys), model.score[...].shape)
    trainable = nnx.state(model, trainable_filter(spec))
    assert ("score",) in {path for path, _ in nnx.to_flat_state(trainable)}

    def seq_cls():
        return transformers.AutoModelForSequenceClassification.from_pretrained(causal, num_labels=1)

    config = peft.LoraConfig(
        task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=list(spec.targets)
    )
    counts = peft.get_peft_model(seq_cls(), config).get_nb_trainable_parameters()
    assert parameter_counts(model, trainable_filter(spec)) == counts
    save_adapter(model, tmp_path / "adapter", spec, base_model=str(causal))
    save_pretrained(merged(model), tmp_path / "merged")
    pairs = make_pairs(seed=4)
    ours = jax_rewards(model, pairs, per_row=2)
    adapter = peft.PeftModel.from_pretrained(seq_cls(), tmp_path / "adapter")
    merged_hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    for hf in (adapter, merged_hf):
        with torch.no_grad():
            chosen, rejected = (r.numpy() for r in torch_rewards(hf.eval(), pairs))
        np.testing.assert_allclose(ours[0], chosen, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(ours[1], rejected, rtol=1e-4, atol=1e-5)


def test_the_config_takes_lora_for_a_reward_model_but_no_lm_head():
    from sft_jax.core.errors import ConfigError
    from sft_jax.train.config_check import check_values

    check_values(RunSpec.of(reward_demo_config(**{"lora.rank": 8})), 1, 1)
    with pytest.raises(ConfigError, match=r"config\.lora\.trainable_modules"):
        check_values(
            RunSpec.of(reward_demo_config(**{"lora.rank": 8, "lora.trainable_modules": "lm_head"})),
            1,
            1,
        )
