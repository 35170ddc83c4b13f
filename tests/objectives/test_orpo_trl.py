"""ORPO against TRL 1.16's ORPOTrainer itself (trl.experimental.orpo): the step-0 eval loss and
TRL's metrics (nll_loss, log_odds_ratio, log_odds_chosen, rewards, log-probs) over a whole eval
set evaluated as one batch, and the gradient of its training loss, on pairs of a chat template
(Qwen2.5's) and of plain text that sft_jax's data pipeline tokenizes and packs two to a row.

TRL's NLL term covers every token of the chosen sequence after its first, prompt included; the
preference.orpo_nll="reply" option (the completion tokens only) differs from it, by much more
than the tolerance."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from chat_tokenizers import make_tokenizer, real_template_tokenizer
from flax import nnx
from hf_models import randomize_

from configs import base
from sft_jax.data import preference as pref
from sft_jax.data import tokenize as tok
from sft_jax.models import from_pretrained
from sft_jax.objectives.preference import PairObjective, PreferenceSpec, chosen_sequence_mask
from sft_jax.train.step import add_sums

pytest.importorskip("trl")

BETA = 0.1
QWEN = "Qwen-Qwen2.5-7B-Instruct"
# TRL's metrics, which sft_jax logs under the same names (eval_x there is eval/x here).
METRICS = ("loss", "nll_loss", "log_odds_ratio", "log_odds_chosen", "rewards/chosen",
           "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected")  # fmt: skip


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _reply(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


# (prompt, chosen, rejected): prompts longer and shorter than their replies.
PAIRS = [
    ("What is 2 + 2 ?", "4", "5"),
    ("Add 17 and 25", "42", "43 okay"),
    ("Reverse cat", "tac", "cat"),
    ("Sort these letters d b a c", "a b c d", "d c b a"),
    ("How are you ?", "Fine thanks !", "No"),
    ("Answer with one word", "Yes", "No okay"),
]


def chat_records() -> list[dict]:
    records = [
        {"prompt": _user(p), "chosen": _reply(c), "rejected": _reply(r)} for p, c, r in PAIRS
    ]
    records[1]["prompt"] = [{"role": "system", "content": "Be brief"}, *records[1]["prompt"]]
    return records


def text_records() -> list[dict]:
    return [{"prompt": p, "chosen": " " + c, "rejected": " " + r} for p, c, r in PAIRS]


def qwen_tokenizer(records: list[dict]):
    bare = real_template_tokenizer(QWEN, "")
    corpus = "".join(
        bare.apply_chat_template(r["prompt"] + r[side], tokenize=False)
        for r in records
        for side in ("chosen", "rejected")
    )
    return real_template_tokenizer(QWEN, corpus)


@pytest.fixture(scope="module", params=["qwen2.5_template", "plain_text"])
def setup(request, tmp_path_factory):
    """(name, records, tokenizer, sft_jax's Pairs of them, saved model dir, its HF model): a
    tiny random Llama over the tokenizer's vocabulary (plain text: a BOS-adding tokenizer)."""
    if request.param == "plain_text":
        records, tokenizer = text_records(), make_tokenizer("llama3")
    else:
        records = chat_records()
        tokenizer = qwen_tokenizer(records)
    config = base.get_config()
    options = tok.Options("messages", config.data.train_on, 512, False)
    stream = [types.SimpleNamespace(value=r, where=f"pairs:{i}") for i, r in enumerate(records)]
    pairs = pref.tokenize_pairs(tokenizer, stream, options)
    assert len(pairs) == len(records)
    path = tmp_path_factory.mktemp(request.param.replace(".", "_"))
    tokenizer.save_pretrained(path)
    hf_config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    hf_model = transformers.LlamaForCausalLM(hf_config)
    randomize_(hf_model, seed=3)
    hf_model.save_pretrained(path)
    return request.param, records, tokenizer, pairs, path, hf_model.float().eval()


def trl_features(pairs) -> list[dict]:
    """The pairs as ORPOTrainer.tokenize_row lays them out: input_ids, attention_mask, and labels
    that are the input_ids with -100 off the completion tokens."""
    features = []
    for k in range(len(pairs)):
        feature = {}
        for side, doc in (("chosen", 2 * k), ("rejected", 2 * k + 1)):
            tokens, trained = pairs.documents.document(doc)
            feature[f"{side}_input_ids"] = [int(t) for t in tokens]
            feature[f"{side}_attention_mask"] = [1] * len(tokens)
            feature[f"{side}_labels"] = [
                int(t) if m else -100 for t, m in zip(tokens, trained, strict=True)
            ]
        features.append(feature)
    return features


def orpo_trainer(setup, tmp_path):
    """TRL's ORPOTrainer on the HF model, its eval set the pairs as one batch, in float32 (TRL
    defaults to bf16 autocast). On plain text its own tokenization of the records (checked equal
    to sft_jax's); under the chat template sft_jax's tokens (TRL's ORPO appends one more EOS
    after the template's trailing newline: a tokenization difference, not the loss's)."""
    import datasets
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    name, records, tokenizer, pairs, _, hf_model = setup
    args = ORPOConfig(
        output_dir=str(tmp_path), beta=BETA, per_device_eval_batch_size=len(records),
        report_to=[], use_cpu=True, bf16=False, max_length=512, disable_dropout=True,
    )  # fmt: skip
    text = datasets.Dataset.from_list(records)
    trainer = ORPOTrainer(model=hf_model, args=args, processing_class=tokenizer,
                          train_dataset=text, eval_dataset=text)  # fmt: skip
    ours = datasets.Dataset.from_list(trl_features(pairs))
    if name == "plain_text":
        for column in ours.column_names:
            assert trainer.eval_dataset[column] == ours[column], column
        return trainer, trainer.eval_dataset
    return trainer, ours


def batches_of(pairs):
    """The pairs two to a row, then an empty row; as two eval batches of two rows each."""
    row_len = 2 * int(max(pairs.lengths()))
    rows = [[k, k + 1] for k in range(0, len(pairs) - 1, 2)] + [[]]
    groups = [rows[i : i + 2] for i in range(0, len(rows), 2)]
    return [
        {k: jnp.asarray(v) for k, v in pairs.make_rows(group, row_len).items()} for group in groups
    ]


def objective(orpo_nll: str = "prompt_and_reply") -> PairObjective:
    return PairObjective(PreferenceSpec("orpo", beta=BETA, orpo_nll=orpo_nll), "none", 2, 8)


def eval_metrics(model, chosen: PairObjective, batches) -> dict[str, float]:
    """As train.evaluation.evaluate: the sums of the eval batches added up."""
    totals = None
    for batch in batches:
        sums = jax.device_get(chosen.sums(model, batch))
        totals = sums if totals is None else add_sums(chosen, totals, sums, np.add)
    return chosen.eval_metrics(totals)


def test_orpo_eval_loss_and_metrics_equal_trl_orpo_trainer(setup, tmp_path):
    name, records, _, pairs, path, _ = setup
    trainer, eval_set = orpo_trainer(setup, tmp_path)
    theirs = trainer.evaluate(eval_dataset=eval_set)
    model, batches = from_pretrained(path), batches_of(pairs)
    ours = eval_metrics(model, objective(), batches)
    assert ours["eval/pairs"] == len(records)
    for metric in METRICS:
        np.testing.assert_allclose(ours[f"eval/{metric}"], theirs[f"eval_{metric}"], rtol=2e-6,
                                   atol=1e-7, err_msg=f"{name}: {metric}")  # fmt: skip
    # ORPO's loss: the NLL term less beta x the mean log sigmoid of the log odds ratio.
    np.testing.assert_allclose(
        ours["eval/loss"], ours["eval/nll_loss"] - BETA * ours["eval/log_odds_ratio"], rtol=1e-6
    )
    # The reply-only NLL (orpo_nll="reply") is not TRL's: the comparison above tells them apart.
    reply = eval_metrics(model, objective("reply"), batches)
    assert reply["eval/nll_loss"] == pytest.approx(reply["eval/nll"], rel=1e-6)
    assert abs(reply["eval/loss"] / theirs["eval_loss"] - 1) > 1e-3
    for same in ("log_odds_ratio", "log_odds_chosen", "rewards/margins", "logps/chosen"):
        assert reply[f"eval/{same}"] == pytest.approx(ours[f"eval/{same}"], rel=1e-6)


def test_orpo_training_loss_and_gradient_equal_trl_orpo_trainer(setup, tmp_path):
    """One batch of all the pairs: ORPOTrainer.compute_loss and its gradient norm (every
    parameter) against the train step's loss and metrics (train/...) and gradient norm."""
    _, _, _, pairs, path, _ = setup
    trainer, eval_set = orpo_trainer(setup, tmp_path)
    inputs = trainer.data_collator([eval_set[i] for i in range(len(eval_set))])
    trainer.model.zero_grad()
    trl_loss = trainer.compute_loss(trainer.model, inputs)
    trl_loss.backward()
    trl_loss = float(trl_loss.detach())
    trl_grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
    trl_norm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in trl_grads)))
    trl_metrics = {k: v[-1] for k, v in trainer._stored_metrics["train"].items()}

    model = from_pretrained(path)
    parts = batches_of(pairs)
    batch = {k: jnp.concatenate([b[k] for b in parts]) for k in parts[0]}
    chosen = objective()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params):
        sums = chosen.sums(nnx.merge(graphdef, params, rest), batch)
        return chosen.loss(sums, chosen.normalizer(batch)), sums

    grads, sums = jax.grad(loss, has_aux=True)(params)
    ours = chosen.metrics(sums, chosen.normalizer(batch))
    norm = float(jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(grads))))
    np.testing.assert_allclose(float(ours["train/loss"]), trl_loss, rtol=2e-6)
    np.testing.assert_allclose(norm, trl_norm, rtol=1e-5)
    assert norm > 1e-2
    for trl_name in ("nll_loss", "log_odds_ratio", "log_odds_chosen", "rewards/margins"):
        np.testing.assert_allclose(float(ours[f"train/{trl_name}"]), trl_metrics[trl_name],
                                   rtol=2e-6, atol=1e-7, err_msg=trl_name)  # fmt: skip


def test_chosen_sequence_mask_counts_every_chosen_token_after_the_first(setup):
    """Per chosen sequence of L tokens, L - 1 positions (all but its last: TRL's shifted labels),
    none of a rejected one or of padding; unchanged by the context axis's token order."""
    _, _, _, pairs, _, _ = setup
    batch = batches_of(pairs)[0]
    mask = np.asarray(chosen_sequence_mask(batch, 2))
    segments, positions = np.asarray(batch["segment_ids"]), np.asarray(batch["positions"])
    for row in range(mask.shape[0]):
        for segment in range(1, segments[row].max() + 1):
            where = segments[row] == segment
            expected = (positions[row] < where.sum() - 1) & (segment % 2 == 1)
            np.testing.assert_array_equal(mask[row][where], expected[where])
    assert not mask[segments == 0].any()
    order = np.random.default_rng(0).permutation(mask.shape[1])
    shuffled = {k: v[:, order] for k, v in batch.items()}
    np.testing.assert_array_equal(np.asarray(chosen_sequence_mask(shuffled, 2)), mask[:, order])
