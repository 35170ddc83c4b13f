"""Preference losses (DPO sigmoid/cDPO, robust, hinge, IPO, SimPO, ORPO, rpo_alpha) against a
PyTorch reference written here from the published formulas, and against TRL's own code; the LoRA
reference (adapters off) against the base model; packed pairs against unpacked ones."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import torch.nn.functional as F
import transformers
from flax import nnx
from hf_models import save_hf_model
from test_step import train_config

from sft_jax.adapters.lora import LoRASpec, adapters_off, apply_lora, save_adapter, trainable_filter
from sft_jax.core.spec import RunSpec
from sft_jax.data.batches import make_rows
from sft_jax.models import from_pretrained
from sft_jax.models.decoder import decoder_linears
from sft_jax.models.layers import LoRAParam
from sft_jax.objectives.loss import CrossEntropy, token_logps
from sft_jax.objectives.preference import PairCount, PairObjective, PreferenceSpec
from sft_jax.train import sharding
from sft_jax.train.compiled import build_steps, init_state
from sft_jax.train.optim import make_optimizer
from sft_jax.train.sharding import device_batch
from sft_jax.train.step import StepOptions

LORA = LoRASpec(rank=4, alpha=8.0)
SEQ_LEN = 48
CASES = {  # name -> PreferenceSpec
    "sigmoid": PreferenceSpec("sigmoid", beta=0.5),
    "cdpo": PreferenceSpec("sigmoid", beta=0.5, label_smoothing=0.2),
    "robust": PreferenceSpec("robust", beta=0.5, label_smoothing=0.1),
    "hinge": PreferenceSpec("hinge", beta=0.5),
    "ipo": PreferenceSpec("ipo", beta=0.5),
    "rpo": PreferenceSpec("sigmoid", beta=0.5, rpo_alpha=0.7),
    "simpo": PreferenceSpec("simpo", beta=2.0, simpo_gamma=0.5),
    "simpo_cpo_alpha": PreferenceSpec("simpo", beta=2.0, simpo_gamma=0.5, rpo_alpha=1.0),
    "orpo": PreferenceSpec("orpo", beta=0.1),
    "orpo_reply": PreferenceSpec("orpo", beta=0.1, orpo_nll="reply"),
}


class Docs:
    """Documents for make_rows: pair k is documents 2k (chosen) and 2k + 1 (rejected)."""

    def __init__(self, pairs):
        self.docs = [doc for pair in pairs for doc in pair]

    def document(self, index):
        return self.docs[index]


def make_pairs(seed: int = 0, count: int = 6):
    """(tokens, trained) of chosen and rejected per pair: a shared prompt, two replies."""
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(count):
        prompt = rng.integers(3, 128, size=rng.integers(2, 5))
        replies = [rng.integers(3, 128, size=rng.integers(1, 5)) for _ in range(2)]
        pairs.append(
            tuple(
                (np.concatenate([prompt, r]), np.r_[np.zeros(len(prompt)), np.ones(len(r))] > 0)
                for r in replies
            )
        )
    return pairs


def pair_batch(pairs, per_row: int, rows: int | None = None):
    """The pairs, `per_row` to a row (chosen then rejected, their own segments)."""
    groups = [list(range(2 * k, min(2 * (k + per_row), 2 * len(pairs))))
              for k in range(0, len(pairs), per_row)]  # fmt: skip
    groups += [[] for _ in range((rows or len(groups)) - len(groups))]
    return make_rows(Docs(pairs), groups, SEQ_LEN)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(base dir, a LoRA model with trained-looking adapters, its PEFT adapter dir)."""
    path = tmp_path_factory.mktemp("llama")
    save_hf_model("llama3.1", path)
    mesh = sharding.single_device_mesh()
    model = from_pretrained(path, mesh=mesh)
    apply_lora(model, LORA, mesh)
    keys = iter(jax.random.split(jax.random.key(1), 100))
    for _, _, linear in decoder_linears(model):
        linear.lora_b[...] = 0.3 * jax.random.normal(next(keys), linear.lora_b[...].shape)
    save_adapter(model, path / "adapter", LORA, base_model=str(path))
    return path, model, path / "adapter"


def peft_model(path, adapter, fused_head: bool = False):
    base = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
    if fused_head:  # TRL patches the base before PEFT wraps it
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(base, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    model = peft.PeftModel.from_pretrained(base.float(), adapter, is_trainable=True)
    return model.train()  # dropout is 0: train() changes nothing but what TRL reads


def jax_loss_and_grad_norm(model, objective, batch):
    graphdef, params, rest = nnx.split(model, trainable_filter(LORA), ...)
    batch = {k: jnp.asarray(v) for k, v in batch.items()}

    def loss(params):
        sums = objective.sums(nnx.merge(graphdef, params, rest), batch)
        return objective.loss(sums, objective.normalizer(batch)), sums

    grads, sums = jax.grad(loss, has_aux=True)(params)
    value = objective.loss(sums, objective.normalizer(batch))
    return float(value), float(jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(grads)))), sums


# --- The PyTorch reference, from the papers' formulas ------------------------------------


def torch_sequence(model, tokens, trained):
    """(sum of log p over the completion tokens, their count, sum of log p over every token
    after the first, their count): one sequence alone in its own row (unpacked)."""
    ids = torch.as_tensor(tokens[None], dtype=torch.long)
    logits = model(input_ids=ids).logits[0, :-1].float()
    logp = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None])[:, 0]
    mask = torch.as_tensor(trained[1:], dtype=torch.float32)
    return (logp * mask).sum(), mask.sum(), logp.sum(), torch.tensor(float(logp.numel()))


def torch_logps(model, pairs, reference: bool):
    """c, r: completion log-probs of the chosen and rejected sequences, nc, nr their token
    counts; s, ns: the chosen sequences' log-probs over every token after the first (ORPO's NLL,
    as TRL's) and their counts."""
    out = {"c": [], "r": [], "nc": [], "nr": [], "s": [], "ns": []}
    for chosen, rejected in pairs:
        for key, (tokens, trained) in (("c", chosen), ("r", rejected)):
            if reference:
                with torch.no_grad(), model.disable_adapter():
                    logp, n, sequence, tokens_after_first = torch_sequence(model, tokens, trained)
            else:
                logp, n, sequence, tokens_after_first = torch_sequence(model, tokens, trained)
            out[key].append(logp)
            out["n" + key].append(n)
            if key == "c":
                out["s"].append(sequence)
                out["ns"].append(tokens_after_first)
    return {k: torch.stack(v) for k, v in out.items()}


def torch_loss(spec: PreferenceSpec, pol, ref):
    """Rafailov et al. (DPO), Mitchell (cDPO), Chowdhury et al. (robust), Azar et al. (IPO,
    per-token as TRL), Meng et al. (SimPO), Hong et al. (ORPO); means over pairs."""
    b, e = spec.beta, spec.label_smoothing
    ls = F.logsigmoid
    if spec.loss_type in ("simpo", "orpo"):
        c, r = pol["c"] / pol["nc"], pol["r"] / pol["nr"]
        if spec.loss_type == "simpo":
            m = c - r - spec.simpo_gamma / b
            pair = -(1 - e) * ls(b * m) - e * ls(-b * m)
        else:
            log_odds = (c - r) - (torch.log(1 - torch.exp(c)) - torch.log(1 - torch.exp(r)))
            pair = -b * ls(log_odds)
    else:
        cr, rr = pol["c"] - ref["c"], pol["r"] - ref["r"]
        d = cr - rr
        pair = {
            "sigmoid": lambda: -(1 - e) * ls(b * d) - e * ls(-b * d),
            "robust": lambda: (-(1 - e) * ls(b * d) + e * ls(-b * d)) / (1 - 2 * e),
            "hinge": lambda: torch.relu(1 - b * d),
            "ipo": lambda: (cr / pol["nc"] - rr / pol["nr"] - 1 / (2 * b)) ** 2,
        }[spec.loss_type]()
    nll = -pol["c"].sum() / pol["nc"].sum()
    loss = pair.mean() + spec.nll_weight * nll
    if spec.orpo_sequence_nll:  # ORPO's NLL as TRL's: the chosen sequences, prompt included
        loss = loss - pol["s"].sum() / pol["ns"].sum()
    return loss


def torch_grad_norm(model, loss) -> float:
    model.zero_grad()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    return float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads)))


def objective_for(spec: PreferenceSpec, max_pairs: int) -> PairObjective:
    reference = "none" if spec.loss_type in ("simpo", "orpo") else "adapters_off"
    return PairObjective(spec, reference, max_pairs=max_pairs, loss_chunk_size=8)


@pytest.mark.parametrize("case", list(CASES))
def test_loss_and_grad_norm_equal_the_published_formulas(tiny, case):
    path, model, adapter = tiny
    spec, pairs = CASES[case], make_pairs()
    loss, grad_norm, sums = jax_loss_and_grad_norm(
        model, objective_for(spec, 2), pair_batch(pairs, per_row=2, rows=4)
    )
    torch_model = peft_model(path, adapter)
    policy, reference = (
        torch_logps(torch_model, pairs, False),
        torch_logps(torch_model, pairs, True),
    )
    expected = torch_loss(spec, policy, reference)
    assert float(sums.pairs) == len(pairs)
    np.testing.assert_allclose(loss, float(expected), rtol=1e-4)
    np.testing.assert_allclose(grad_norm, torch_grad_norm(torch_model, expected), rtol=1e-4)
    assert grad_norm > 1e-3  # the comparison means something


# --- TRL's own code on the same model and pairs --------------------------------------------


def trl_inputs(pairs, reference):
    """DPOTrainer's collated batch: chosen rows then rejected rows, right-padded."""
    sequences = [pair[0] for pair in pairs] + [pair[1] for pair in pairs]
    width = max(len(tokens) for tokens, _ in sequences)
    ids = torch.zeros((len(sequences), width), dtype=torch.long)
    attention, completion = torch.zeros_like(ids), torch.zeros_like(ids)
    for row, (tokens, trained) in enumerate(sequences):
        ids[row, : len(tokens)] = torch.as_tensor(tokens)
        attention[row, : len(tokens)] = 1
        completion[row, : len(tokens)] = torch.as_tensor(trained.astype(np.int64))
    return {"input_ids": ids, "attention_mask": attention, "completion_mask": completion,
            "ref_chosen_logps": reference["c"], "ref_rejected_logps": reference["r"]}  # fmt: skip


def trl_dpo_loss(model, inputs, spec: PreferenceSpec):
    """trl.DPOTrainer._compute_loss itself, on a stand-in for the trainer's attributes (the
    reference log-probs given, as with precompute_ref_log_probs)."""
    from collections import defaultdict

    from trl import DPOTrainer

    accelerator = types.SimpleNamespace(
        device="cpu", gather=lambda x: x, gather_for_metrics=lambda x: x
    )
    losses, weights = [spec.loss_type], [1.0]
    if spec.rpo_alpha:  # TRL 1.16's rpo_alpha: the "sft" loss beside sigmoid
        losses, weights = [spec.loss_type, "sft"], [1.0, spec.rpo_alpha]
    trainer = types.SimpleNamespace(
        model=model, accelerator=accelerator, aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=losses,
        loss_weights=weights, beta=spec.beta, label_smoothing=spec.label_smoothing,
        use_weighting=False, _metrics={"train": defaultdict(list)}, _total_train_tokens=0,
        _tp_size=1,
    )  # fmt: skip
    loss = DPOTrainer._compute_loss(trainer, model, inputs, False)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}


@pytest.mark.parametrize("case", ["sigmoid", "robust", "hinge", "ipo", "rpo"])
def test_dpo_losses_and_metrics_equal_trl(tiny, case):
    pytest.importorskip("trl")
    path, model, adapter = tiny
    spec, pairs = CASES[case], make_pairs(seed=1)
    objective = objective_for(spec, 1)
    loss, grad_norm, sums = jax_loss_and_grad_norm(model, objective, pair_batch(pairs, 1))
    torch_model = peft_model(path, adapter, fused_head=True)
    reference = torch_logps(peft_model(path, adapter), pairs, True)
    trl_loss, trl_metrics = trl_dpo_loss(torch_model, trl_inputs(pairs, reference), spec)
    np.testing.assert_allclose(loss, float(trl_loss), rtol=1e-4)
    np.testing.assert_allclose(grad_norm, torch_grad_norm(torch_model, trl_loss), rtol=1e-4)
    ours = objective.metrics(sums, _count(sums))
    for name in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                 "logps/chosen", "logps/rejected"):  # fmt: skip
        np.testing.assert_allclose(float(ours[f"train/{name}"]), trl_metrics[name], rtol=1e-4,
                                   atol=1e-6, err_msg=name)  # fmt: skip


def _count(sums):
    return PairCount(sums.pairs, sums.chosen_tokens, sums.sequence_tokens)


@pytest.mark.parametrize("case", ["simpo", "simpo_cpo_alpha", "orpo", "orpo_reply"])
def test_simpo_and_orpo_equal_trl_loss_functions(tiny, case):
    """CPOTrainer.cpo_loss / ORPOTrainer.odds_ratio_loss on the per-token mean log-probs; the
    NLL of CPO's cpo_alpha is of the chosen completion tokens, ORPO's of every chosen token
    after the first, prompt included, as TRL's (orpo_nll="reply": the completion tokens).
    tests/objectives/test_orpo_trl.py runs ORPOTrainer itself."""
    pytest.importorskip("trl")
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer

    path, model, adapter = tiny
    spec, pairs = CASES[case], make_pairs(seed=2)
    loss, _, _ = jax_loss_and_grad_norm(model, objective_for(spec, 3), pair_batch(pairs, 3))
    policy = torch_logps(peft_model(path, adapter), pairs, False)
    chosen, rejected = policy["c"] / policy["nc"], policy["r"] / policy["nr"]
    nll = -policy["c"].sum() / policy["nc"].sum()
    if spec.orpo_sequence_nll:
        nll = -policy["s"].sum() / policy["ns"].sum()
    device = types.SimpleNamespace(device="cpu")
    if spec.loss_type == "simpo":
        trainer = types.SimpleNamespace(alpha=0.0, beta=spec.beta, simpo_gamma=spec.simpo_gamma,
                                        label_smoothing=0.0, loss_type="simpo",
                                        accelerator=device)  # fmt: skip
        losses = CPOTrainer.cpo_loss(trainer, chosen, rejected)[0]
        expected = losses.mean() + spec.rpo_alpha * nll
    else:
        trainer = types.SimpleNamespace(beta=spec.beta, accelerator=device)
        losses = ORPOTrainer.odds_ratio_loss(trainer, chosen, rejected)[0]
        expected = nll - losses.mean()
    np.testing.assert_allclose(loss, float(expected), rtol=1e-4)


# --- Packing and the LoRA reference ---------------------------------------------------------


@pytest.mark.parametrize("case", ["sigmoid", "ipo", "orpo"])
def test_packed_pairs_equal_unpacked(tiny, case):
    """One pair per row, three per row (segment ids keep them apart) and padding rows: the
    same loss, gradient norm and metrics."""
    _, model, _ = tiny
    pairs, spec = make_pairs(seed=3), CASES[case]
    one = jax_loss_and_grad_norm(model, objective_for(spec, 1), pair_batch(pairs, 1, rows=8))
    three = jax_loss_and_grad_norm(model, objective_for(spec, 3), pair_batch(pairs, 3))
    np.testing.assert_allclose(one[:2], three[:2], rtol=1e-5)
    for a, b in zip(one[2], three[2], strict=True):
        np.testing.assert_allclose(float(a), float(b), rtol=1e-5, atol=1e-6)


def test_lora_reference_is_the_base_model(tiny):
    path, model, _ = tiny
    batch = {k: jnp.asarray(v) for k, v in pair_batch(make_pairs(seed=4), 2).items()}
    base = token_logps(from_pretrained(path), batch, 8)
    with_adapters = token_logps(model, batch, 8)
    with adapters_off(model):
        reference = token_logps(model, batch, 8)
    mask = np.asarray(batch["target_mask"])
    np.testing.assert_allclose(np.asarray(reference)[mask], np.asarray(base)[mask], rtol=1e-6)
    assert np.abs(np.asarray(with_adapters - base)[mask]).max() > 1e-2  # adapters matter
    # ... and the adapters are back on after the block.
    np.testing.assert_array_equal(token_logps(model, batch, 8), with_adapters)


def test_token_logps_equal_the_cross_entropy_sums(tiny):
    """token_logps (chunked, per token) and loss_sums agree: the same chunked head."""
    _, model, _ = tiny
    batch = {k: jnp.asarray(v) for k, v in pair_batch(make_pairs(seed=5), 2).items()}
    logps = token_logps(model, batch, 8)
    sums = CrossEntropy(loss_chunk_size=8).sums(model, batch)
    np.testing.assert_allclose(
        -float(jnp.sum(jnp.where(batch["target_mask"], logps, 0.0))), float(sums.nll), rtol=1e-6
    )


def compiled_memory(model, objective):
    return compiled_memory_of(model, objective, trainable_filter(LORA))


def compiled_memory_of(model, objective, trainable):
    """XLA's memory plan of the compiled train step (single device)."""
    mesh = sharding.single_device_mesh()
    tx, schedule = make_optimizer(train_config())
    _, shardings = init_state(model, tx, mesh, trainable)
    steps = build_steps(
        model, tx, schedule, mesh, shardings, train_rows=4, eval_rows=4, seq_len=SEQ_LEN,
        options=StepOptions(loss_chunk_size=8), trainable=trainable, objective=objective,
    )  # fmt: skip
    return steps.train_memory


def test_lora_dpo_step_holds_no_second_copy_of_the_weights(tiny):
    """XLA's memory plan of the compiled LoRA train step: a DPO step (reference = adapters off)
    takes exactly the arguments of the SFT step (no reference weights), and its extra
    temporaries are less than one copy of the frozen weights."""
    _, model, _ = tiny
    frozen_bytes = sum(
        x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model, nnx.Not(LoRAParam)))
    )
    sft = compiled_memory(model, None)
    dpo = compiled_memory(model, objective_for(CASES["sigmoid"], 1))
    assert dpo.arguments == sft.arguments
    assert dpo.temporaries - sft.temporaries < frozen_bytes


def _train_pairs(model, objective, mesh, trainable, accumulation: int = 1, steps: int = 3):
    # 3 steps: the test schedule warms up over 2, so the first update has learning rate 0.
    tx, schedule = make_optimizer(train_config(learning_rate=3e-2, weight_decay=0.0))
    state, shardings = init_state(model, tx, mesh, trainable)
    compiled = build_steps(
        model, tx, schedule, mesh, shardings, train_rows=8, eval_rows=8, seq_len=SEQ_LEN,
        options=StepOptions(gradient_accumulation_steps=accumulation, loss_chunk_size=8),
        trainable=trainable, objective=objective,
    )  # fmt: skip
    history = []
    batch = pair_batch(make_pairs(seed=10, count=12), per_row=2, rows=8)  # learnt over steps
    for _ in range(steps):
        state, metrics = compiled.train(state, device_batch(batch, compiled.batch_shardings))
        history.append({k: float(v) for k, v in jax.device_get(metrics).items()})
    return history


@pytest.mark.parametrize("case, lora", [("sigmoid", True), ("orpo", False)])
def test_preference_steps_on_a_mesh_and_accumulated_equal_one_device(tiny, case, lora):
    """DPO (LoRA, reference = adapters off) and ORPO (every parameter): 3 updates on 8 devices
    (data x fsdp x tensor = 2 x 2 x 2, vocabulary split) and with 2 micro-batches give the
    losses and metrics of one device and one batch."""
    path = tiny[0]
    objective = objective_for(CASES[case], 2)

    def run(mesh, accumulation=1):
        model = from_pretrained(path, mesh=mesh)
        trainable = nnx.Param
        if lora:
            apply_lora(model, LORA, mesh)
            trainable = trainable_filter(LORA)
        return _train_pairs(model, objective, mesh, trainable, accumulation)

    single = run(sharding.single_device_mesh())
    assert single[-1]["train/loss"] < single[0]["train/loss"]
    for other in (run(sharding.make_mesh(2, 2, 2)), run(sharding.single_device_mesh(), 2)):
        for a, b in zip(single, other, strict=True):
            for key in a:
                np.testing.assert_allclose(b[key], a[key], rtol=2e-5, atol=1e-6, err_msg=key)


# --- Config and the loop ---------------------------------------------------------------------


def small_pair_config(name: str):
    """configs/NAME.py on the demo model (not the SFT demo's export), trained and evaluated on
    the 200 eval pairs."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location(name, root / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    pairs = str(root / "assets" / "demo_data" / "preference_eval.jsonl")
    config.model.name_or_path = str(root / "assets" / "demo_model")
    config.data.train_files = config.data.eval_files = pairs
    return config


def demo_dpo_config(**overrides):
    config = small_pair_config("dpo_demo")
    config.train.steps, config.eval.every_steps, config.train.global_batch_size = 4, 2, 8
    config.eval.global_batch_size, config.eval.generate_examples = 8, 2
    config.eval.show_samples, config.checkpoint.enabled, config.export.at_end = 0, False, "none"
    config.update_from_flattened_dict(overrides)
    return config


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"train.objective": "kto"}, "train.objective"),
        ({"lora.rank": 0, "preference.reference": "adapters_off"}, "preference.reference"),
        ({"preference.reference": "precomputed", "data.loader": "stream"}, "data.loader"),
        ({"lora.trainable_modules": "embed"}, "lora.trainable_modules"),
        ({"preference.loss_type": "simpo"}, "preference.loss_type"),
        ({"preference.label_smoothing": 0.5}, "preference.label_smoothing"),
        ({"preference.beta": 0.0}, "preference.beta"),
        ({"preference.orpo_nll": "prompt"}, "preference.orpo_nll"),
        ({"data.eval_fraction": 0.1}, "data.eval_fraction"),
        ({"data.max_documents_per_row": 1}, "data.max_documents_per_row"),
    ],
)
def test_config_check_names_the_bad_preference_field(overrides, field):
    from sft_jax.core.errors import ConfigError
    from sft_jax.train.config_check import check_values

    check_values(RunSpec.of(demo_dpo_config()), 1, 1)  # the demo itself is fine
    with pytest.raises(ConfigError, match=f"config.{field}"):
        check_values(RunSpec.of(demo_dpo_config(**overrides)), 1, 1)


@pytest.mark.parametrize("reference", ["auto", "adapters_off"])
def test_full_modules_with_an_adapters_off_reference_are_refused_naming_the_fix(reference):
    """Modules LoRA trains in full are not adapters: turning the adapters off would not give
    the initial model back. Refused naming both fields and the reference that works."""
    from sft_jax.core.errors import ConfigError
    from sft_jax.train.config_check import check_values

    overrides = {"lora.trainable_modules": "embed", "preference.reference": reference}
    with pytest.raises(ConfigError, match=r"config\.lora\.trainable_modules=") as error:
        check_values(RunSpec.of(demo_dpo_config(**overrides)), 1, 1)
    assert "preference.reference='adapters_off'" in str(error.value)
    assert "preference.reference='precomputed'" in str(error.value)
    fixed = {**overrides, "preference.reference": "precomputed"}
    check_values(RunSpec.of(demo_dpo_config(**fixed)), 1, 1)


@pytest.mark.e2e
def test_a_dpo_run_reports_trl_metrics_and_starts_at_the_reference(tmp_path):
    """The loop end to end (data, plan, steps, eval): at step 0 the LoRA policy is its
    reference, so every reward is exactly 0 and the eval loss is log 2 + rpo_alpha x the
    chosen NLL."""
    import json
    import math

    from sft_jax.loop import trainer
    from sft_jax.train.setup import open_run_data

    config = demo_dpo_config()
    summary = trainer.run(config, tmp_path, open_run_data)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r for r in records if "eval/loss" in r}
    assert sorted(evals) == [0, 2, 4] and summary["end_step"] == 4
    first = evals[0]
    assert first["eval/rewards/margins"] == first["eval/rewards/chosen"] == 0.0
    assert first["eval/rewards/accuracies"] == 0.0  # ties: TRL counts chosen > rejected
    nll_weight = config.preference.rpo_alpha
    np.testing.assert_allclose(
        first["eval/loss"], math.log(2) + nll_weight * first["eval/nll"], rtol=1e-5
    )
    assert first["eval/pairs"] == 200 and "eval/exact_match" in first
    train = [r for r in records if "train/rewards/accuracies" in r]
    assert train and all(math.isfinite(r["train/loss"]) for r in train)
