"""DPO against a separate reference model (config.preference.reference_model, TRL's ref_model):
step-0 eval loss and metrics against TRL 1.16's DPOTrainer(model, ref_model=...) on an eval set
as one batch, for a reference that differs from the policy (two tiny random Llamas of the same
architecture), held as a frozen copy ('copy') and precomputed ('precomputed'); the config's
semantics with reference / LoRA; a reference of another architecture refused; and short
trainer runs with it (full fine-tuning and LoRA, copy and precomputed)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from chat_tokenizers import make_tokenizer
from hf_models import randomize_, save_hf_model
from test_preference import demo_dpo_config

from configs import base
from sft_jax.core.batch import REFERENCE_KEY
from sft_jax.core.errors import ConfigError
from sft_jax.core.spec import RunSpec
from sft_jax.data import preference as pair_data
from sft_jax.data import tokenize
from sft_jax.models import from_pretrained
from sft_jax.objectives import registry
from sft_jax.objectives.preference_config import load_reference_model, reference_of
from sft_jax.train.config_check import check_values
from sft_jax.train.step import add_sums

BETA = 0.1
PAIRS = [
    ("What is 2 + 2 ?", " 4", " 5"),
    ("Add 17 and 25", " 42", " 43 okay"),
    ("Reverse cat", " tac", " cat"),
    ("Sort these letters d b a c", " a b c d", " d c b a"),
    ("How are you ?", " Fine thanks !", " No"),
    ("Answer with one word", " Yes", " No okay"),
]
# TRL's eval metrics, which sft_jax logs under the same names (eval_x there is eval/x here).
METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
           "rewards/margins", "logps/chosen", "logps/rejected")  # fmt: skip


def _tiny_llama(tokenizer, seed: int) -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    randomize_(model, seed=seed)
    return model.float().eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(tokenizer, policy dir, reference dir, HF policy, HF reference): two tiny random Llamas
    of one architecture and vocabulary, with different weights."""
    tokenizer = make_tokenizer("llama3")
    root = tmp_path_factory.mktemp("dpo_ref")
    policy, reference = _tiny_llama(tokenizer, seed=3), _tiny_llama(tokenizer, seed=14)
    policy.save_pretrained(root / "policy")
    reference.save_pretrained(root / "reference")
    tokenizer.save_pretrained(root / "policy")
    return tokenizer, root / "policy", root / "reference", policy, reference


def trl_eval(models, loss_type: str, tmp_path):
    """TRL's DPOTrainer with ref_model, float32, its eval set every pair as one batch:
    (its eval metrics, its tokenized eval set: prompt_ids, chosen_ids, rejected_ids)."""
    import datasets
    from trl import DPOConfig, DPOTrainer

    tokenizer, _, _, policy, reference = models
    args = DPOConfig(
        output_dir=str(tmp_path), beta=BETA, loss_type=[loss_type], report_to=[], use_cpu=True,
        bf16=False, max_length=512, per_device_eval_batch_size=len(PAIRS),
        precompute_ref_log_probs=False,
    )  # fmt: skip
    records = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in PAIRS]
    text = datasets.Dataset.from_list(records)
    trainer = DPOTrainer(
        model=policy,
        ref_model=reference,
        args=args,
        processing_class=tokenizer,
        train_dataset=text,
        eval_dataset=text,
    )
    return trainer.evaluate(), trainer.eval_dataset


def pairs_of(eval_set) -> pair_data.Pairs:
    """TRL's tokens as sft_jax's pairs: the prompt untrained, the completion trained."""
    documents = []
    for example in eval_set:
        prompt = list(example["prompt_ids"])
        for side in ("chosen_ids", "rejected_ids"):
            completion = list(example[side])
            tokens = np.asarray(prompt + completion, np.int32)
            documents.append((tokens, np.r_[np.zeros(len(prompt)), np.ones(len(completion))] > 0))
    return pair_data.Pairs(tokenize.from_documents(documents, tokenize.empty_stats()))


def dpo_config(policy_dir, reference_dir, **overrides) -> RunSpec:
    config = base.get_config()
    config.model.name_or_path = str(policy_dir)
    config.train.objective, config.lora.rank = "dpo", 0
    config.preference.beta, config.preference.reference_model = BETA, str(reference_dir)
    config.train.loss_chunk_size = 8
    config.update_from_flattened_dict(overrides)
    return RunSpec.of(config)


def our_eval(models, loss_type: str, reference: str, pairs) -> dict[str, float]:
    """Step 0's eval metrics of sft_jax's DPO objective, built by the registry from a config
    with preference.reference_model (the reference loaded and attached by the objective), over
    the pairs two to a row, in two eval batches."""
    _, policy_dir, reference_dir, _, _ = models
    config = dpo_config(policy_dir, reference_dir, **{
        "preference.loss_type": loss_type, "preference.reference": reference})  # fmt: skip
    check_values(config, 1, 1)
    model = from_pretrained(policy_dir)
    chosen = registry.build(config, model, 5, None)
    assert chosen.reference == reference
    row_len = 2 * int(max(pairs.lengths()))
    rows = [[k, k + 1] for k in range(0, len(pairs) - 1, 2)] + [[]]
    totals = None
    for group in (rows[:2], rows[2:]):
        batch = {k: jnp.asarray(v) for k, v in pairs.make_rows(group, row_len).items()}
        if reference == "precomputed":  # what the reference step fills in before training
            batch[REFERENCE_KEY] = chosen.reference_token_logps(model, batch)
        sums = jax.device_get(chosen.sums(model, batch))
        totals = sums if totals is None else add_sums(chosen, totals, sums, np.add)
    return chosen.eval_metrics(totals)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_step_zero_eval_equals_trl_dpo_trainer_with_ref_model(models, loss_type, tmp_path):
    """Loss, rewards and log-probs at step 0 equal DPOTrainer(model, ref_model=...)'s eval
    (rel 1e-5), the reference as a frozen copy and precomputed; a reference that differs from
    the policy (the margins are far from 0, as they are not against the initial policy)."""
    pytest.importorskip("trl")
    theirs, eval_set = trl_eval(models, loss_type, tmp_path)
    pairs = pairs_of(eval_set)
    for reference in ("copy", "precomputed"):
        ours = our_eval(models, loss_type, reference, pairs)
        assert ours["eval/pairs"] == len(PAIRS)
        for metric in METRICS:
            np.testing.assert_allclose(ours[f"eval/{metric}"], theirs[f"eval_{metric}"],
                                       rtol=1e-5, err_msg=f"{reference}: {metric}")  # fmt: skip
    assert abs(theirs["eval_rewards/margins"]) > 0.1  # the reference is not the policy


def test_a_reference_of_another_architecture_is_a_config_error(tmp_path):
    save_hf_model("llama3.1", tmp_path / "policy")
    save_hf_model("llama3.1", tmp_path / "reference", vocab_size=256, num_hidden_layers=2)
    config = dpo_config(tmp_path / "policy", tmp_path / "reference")
    with pytest.raises(ConfigError) as error:
        load_reference_model(config, from_pretrained(tmp_path / "policy"))
    message = str(error.value)
    assert "config.preference.reference_model=" in message
    assert "vocab_size 256 (the policy's: 128)" in message
    assert "num_layers 2 (the policy's: 3)" in message


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({"lora.rank": 0}, "copy"),
        ({"lora.rank": 8}, "copy"),  # auto: the reference is the other model, not adapters off
        ({"lora.rank": 8, "preference.reference": "precomputed"}, "precomputed"),
        ({"lora.rank": 0, "preference.reference": "copy"}, "copy"),
    ],
)
def test_reference_with_a_reference_model(overrides, expected):
    config = RunSpec.of(demo_dpo_config(**{"preference.reference_model": "/x", **overrides}))
    check_values(config, 1, 1)
    assert reference_of(config) == expected


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"preference.reference": "adapters_off"}, "preference.reference"),
        ({"lora.trainable_modules": "embed"}, "lora.trainable_modules"),
        (
            {"preference.reference": "precomputed", "lora.trainable_modules": "embed"},
            "lora.trainable_modules",
        ),
    ],
)
def test_reference_model_config_errors_name_the_field(overrides, field):
    config = RunSpec.of(demo_dpo_config(**{"preference.reference_model": "/x", **overrides}))
    with pytest.raises(ConfigError, match=f"config.{field}="):
        check_values(config, 1, 1)


# --- The run -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_reference(tmp_path_factory):
    """The demo model with its weights moved: a reference that is not the initial policy."""
    root = tmp_path_factory.mktemp("demo_reference")
    config = demo_dpo_config()
    model = transformers.AutoModelForCausalLM.from_pretrained(config.model.name_or_path)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.02 * torch.randn(param.shape, generator=generator))
    model.save_pretrained(root)
    return root


def run_metrics(tmp_path, reference_dir, **overrides) -> dict[tuple[int, str], float]:
    from sft_jax.loop import trainer
    from sft_jax.train.setup import open_run_data

    config = demo_dpo_config(**{
        "preference.reference_model": str(reference_dir), "train.steps": 2,
        "eval.every_steps": 2, "eval.at_start": True, "eval.generate_examples": 0,
        "log.every_steps": 1, "train.learning_rate": 1e-3, **overrides,
    })  # fmt: skip
    result = trainer.run(config, tmp_path, open_run_data)
    assert result["end_step"] == 2
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    return {(r["step"], k): v for r in map(json.loads, lines) for k, v in r.items()}


@pytest.mark.e2e
@pytest.mark.parametrize("rank", [0, 8])
def test_runs_with_a_reference_model_copy_and_precomputed(tmp_path, demo_reference, rank):
    """2 updates (full fine-tuning and LoRA) against the moved demo model: the step-0 eval
    measures rewards from it (margins not 0, which they are against the initial policy), and
    the frozen copy and the precomputed pass give the same losses and eval metrics."""
    copy = run_metrics(tmp_path / "copy", demo_reference, **{"lora.rank": rank})
    precomputed = run_metrics(tmp_path / "precomputed", demo_reference, **{
        "lora.rank": rank, "preference.reference": "precomputed"})  # fmt: skip
    assert abs(copy[(0, "eval/rewards/margins")]) > 1e-3
    for key in ((0, "eval/loss"), (0, "eval/rewards/margins"), (1, "train/loss"),
                (2, "train/loss"), (2, "eval/loss"), (2, "eval/rewards/margins")):  # fmt: skip
        np.testing.assert_allclose(precomputed[key], copy[key], rtol=1e-5, err_msg=str(key))
    assert copy[(2, "train/loss")] != copy[(1, "train/loss")]  # it trained
