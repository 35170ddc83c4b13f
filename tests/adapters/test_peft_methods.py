"""DoRA and AdaLoRA: PEFT parity (logits, merged export, parameter counts), only adapters train,
AdaLoRA's budget schedule, pruning by importance, final budget and exact resume."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import transformers
from flax import nnx
from hf_models import build_hf_model, hf_logits, save_hf_model
from peft.tuners.adalora.layer import RankAllocator
from test_models import assert_close_on_tokens, jax_logits, padded_batch
from test_step import ROWS, SEQ_LEN, synthetic_batch, train_config

from sft_jax.adapters import adalora
from sft_jax.adapters.adalora import (
    AdaLoRASpec,
    budget_schedule,
    keep_within_budget,
    triplet_scores,
)
from sft_jax.adapters.lora import (
    LoRASpec,
    apply_lora,
    parameter_counts,
    rank_kept,
    save_adapter,
    trainable_filter,
)
from sft_jax.adapters.lora import merged as fold_adapters
from sft_jax.core.spec import RunSpec
from sft_jax.models import from_pretrained, save_pretrained
from sft_jax.models.decoder import decoder_linears
from sft_jax.models.layers import LoRAParam
from sft_jax.train import sharding
from sft_jax.train.compiled import build_steps, init_state
from sft_jax.train.optim import make_optimizer
from sft_jax.train.sharding import device_batch
from sft_jax.train.step import StepOptions
from sft_jax.workdir.checkpointing import Checkpoints

TARGETS = ("q_proj", "v_proj", "down_proj")
ADA = AdaLoRASpec(init_r=6, target_r=2, tinit=2, tfinal=3, delta_t=2, beta1=0.85, beta2=0.85,
                  orth_reg_weight=0.5, total_step=12)  # fmt: skip
DORA = LoRASpec(rank=4, alpha=8.0, targets=TARGETS, use_dora=True)
ADALORA = LoRASpec(rank=6, alpha=8.0, targets=TARGETS, adalora=ADA)


@pytest.fixture(scope="module", params=["llama3.1", "qwen2"])
def base(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param.replace(".", "_"))
    save_hf_model(request.param, path)
    return path


def adapted(path, spec, mesh=None):
    mesh = mesh or sharding.single_device_mesh()
    model = from_pretrained(path, mesh=mesh)
    apply_lora(model, spec, mesh)
    return model


def trained_looking(model, seed: int = 1) -> None:
    """Adapters as after training: B != 0, magnitudes moved, some singular values pruned."""
    keys = iter(jax.random.split(jax.random.key(seed), 300))
    for _, _, linear in decoder_linears(model):
        if linear.lora_b is None:
            continue
        linear.lora_b[...] = 0.3 * jax.random.normal(next(keys), linear.lora_b[...].shape)
        if linear.lora_magnitude is not None:
            noise = jax.random.uniform(next(keys), linear.lora_magnitude[...].shape, minval=0.8)
            linear.lora_magnitude[...] = linear.lora_magnitude[...] * noise
        if linear.lora_e is not None:
            values = jax.random.normal(next(keys), linear.lora_e[...].shape)
            keep = jax.random.bernoulli(next(keys), 0.6, values.shape)
            linear.lora_e[...] = jnp.where(keep, values, 0.0)


@pytest.mark.parametrize("spec", [DORA, ADALORA], ids=["dora", "adalora"])
def test_adapter_loads_in_peft_with_equal_logits_and_merges(base, tmp_path, spec):
    model = adapted(base, spec)
    fresh = jax_logits(model, padded_batch())
    np.testing.assert_allclose(fresh, jax_logits(from_pretrained(base), padded_batch()), atol=1e-5)
    trained_looking(model)
    save_adapter(model, tmp_path / "adapter", spec, base_model=str(base))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == ("ADALORA" if spec.adalora else "LORA")
    hf_base = transformers.AutoModelForCausalLM.from_pretrained(base, attn_implementation="eager")
    peft_model = peft.PeftModel.from_pretrained(hf_base, tmp_path / "adapter").eval()
    batch = padded_batch(seed=3)
    expected = hf_logits(peft_model, batch["input_ids"], batch["attention_mask"])
    assert_close_on_tokens(jax_logits(model, batch), expected, batch["attention_mask"], 1e-4)
    merged_dir = save_pretrained(fold_adapters(model), tmp_path / "merged")
    merged = transformers.AutoModelForCausalLM.from_pretrained(merged_dir)
    merged_logits = hf_logits(merged.eval(), batch["input_ids"], batch["attention_mask"])
    assert_close_on_tokens(merged_logits, expected, batch["attention_mask"], 1e-4)
    if spec.adalora:  # the rank pattern: the triplets kept, as many as the saved tensors hold
        for name, kept in config["rank_pattern"].items():
            module = peft_model.base_model.model.get_submodule(name.removesuffix(".lora_E"))
            assert module.lora_E["default"].shape[0] == sum(kept)
        assert not all(all(kept) for kept in config["rank_pattern"].values())


def peft_counterpart(spec: LoRASpec):
    common = {"target_modules": list(spec.targets), "lora_alpha": spec.alpha}
    if spec.adalora:
        ada = spec.adalora
        return peft.AdaLoraConfig(init_r=ada.init_r, target_r=ada.target_r, tinit=ada.tinit,
                                  tfinal=ada.tfinal, deltaT=ada.delta_t,
                                  total_step=ada.total_step, **common)  # fmt: skip
    return peft.LoraConfig(r=spec.rank, use_dora=spec.use_dora, **common)


@pytest.mark.parametrize("spec", [DORA, ADALORA], ids=["dora", "adalora"])
def test_trainable_parameter_count_equals_peft_and_only_adapters_get_gradients(spec):
    model = adapted(build_and_save_llama(), spec)
    trained, total = parameter_counts(model, trainable_filter(spec))
    peft_model = peft.get_peft_model(build_hf_model("llama3.1"), peft_counterpart(spec))
    assert (trained, total) == peft_model.get_nb_trainable_parameters()
    state = nnx.state(model, trainable_filter(spec))
    assert all(isinstance(v, LoRAParam) for _, v in nnx.to_flat_state(state))
    assert {path[-1] for path, _ in nnx.to_flat_state(state)} == (
        {"lora_a", "lora_b", "lora_magnitude"} if spec.use_dora else {"lora_a", "lora_b", "lora_e"}
    )


_LLAMA = {}


def build_and_save_llama():
    """A tiny Llama on disk, made once for this module's single-family tests."""
    if "path" not in _LLAMA:
        import tempfile
        from pathlib import Path

        _LLAMA["path"] = Path(tempfile.mkdtemp()) / "llama"
        save_hf_model("llama3.1", _LLAMA["path"])
    return _LLAMA["path"]


# --- AdaLoRA's rank allocation --------------------------------------------------------------


class _PeftSchedule:
    """PEFT's RankAllocator.budget_schedule, on a config and a count of adapted matrices."""

    def __init__(self, spec: AdaLoRASpec, matrices: int):
        self.allocator = RankAllocator.__new__(RankAllocator)
        self.allocator.peft_config = peft.AdaLoraConfig(
            init_r=spec.init_r, target_r=spec.target_r, tinit=spec.tinit, tfinal=spec.tfinal,
            deltaT=spec.delta_t, total_step=spec.total_step,
        )  # fmt: skip
        self.allocator.init_bgt = spec.init_r * matrices
        self.allocator.target_bgt = spec.target_r * matrices


@pytest.mark.parametrize(
    "spec",
    [ADA, AdaLoRASpec(12, 8, 200, 500, 10, 0.85, 0.85, 0.5, 3000),
     AdaLoRASpec(8, 3, 0, 0, 1, 0.85, 0.85, 0.5, 37)],
)  # fmt: skip
def test_budget_schedule_equals_peft(spec):
    peft_schedule = _PeftSchedule(spec, matrices=21).allocator
    for step in range(spec.total_step + 5):
        assert budget_schedule(spec, step, 21) == peft_schedule.budget_schedule(step)


def test_lowest_importance_triplets_are_pruned():
    """Two layers of rank 3 whose triplet scores are known: the budget of 4 keeps the four
    highest, wherever they are."""
    ones = {"lora_a": jnp.ones((5, 3)), "lora_b": jnp.ones((3, 7))}

    def layer(e_scores):  # sensitivity e_scores, uncertainty 1 -> score = e + 1 + 1
        sensitivity = {**ones, "lora_e": jnp.asarray(e_scores, jnp.float32)}
        return triplet_scores(sensitivity, {k: jnp.ones_like(v) for k, v in sensitivity.items()})

    scores = {("first",): layer([0.1, 5.0, 0.3]), ("second",): layer([2.0, 0.2, 4.0])}
    np.testing.assert_allclose(scores[("first",)], [2.1, 7.0, 2.3], rtol=1e-6)
    kept = keep_within_budget(scores, jnp.asarray(4))
    np.testing.assert_array_equal(kept[("first",)], [False, True, True])
    np.testing.assert_array_equal(kept[("second",)], [True, False, True])
    everything = keep_within_budget(scores, jnp.asarray(6))
    assert all(np.all(v) for v in everything.values())


def _adalora_steps(model, mesh, spec: LoRASpec):
    tx, schedule = make_optimizer(train_config(learning_rate=3e-2, weight_decay=0.0),
                                  spec.adalora)  # fmt: skip
    trainable = trainable_filter(spec)
    state, shardings = init_state(model, tx, mesh, trainable)
    compiled = build_steps(
        model, tx, schedule, mesh, shardings, train_rows=ROWS, eval_rows=ROWS, seq_len=SEQ_LEN,
        options=StepOptions(loss_chunk_size=4), trainable=trainable,
    )  # fmt: skip
    return state, compiled


def _run(state, compiled, steps: range):
    losses = []
    for _ in steps:
        state, metrics = compiled.train(
            state, device_batch(synthetic_batch(0), compiled.batch_shardings)
        )
        losses.append(float(metrics["train/loss"]))
    return state, losses


def test_adalora_schedule_ends_at_budget_learns_and_resumes_exactly(tmp_path):
    mesh = sharding.single_device_mesh()
    model = adapted(build_and_save_llama(), ADALORA)
    state, compiled = _adalora_steps(model, mesh, ADALORA)
    initial = jax.tree.map(np.array, state)  # the train step donates its input
    total = ADA.total_step
    # Uninterrupted ...
    final, losses = _run(state, compiled, range(total))
    assert losses[-1] < 0.97 * losses[0]  # P, Q ~ N(0, 0.02), Lambda = 0: a slow start
    allocator = adalora.find_state(final["opt_state"])
    keep = [np.asarray(k) for k in jax.tree.leaves(allocator.keep)]
    assert sum(int(k.sum()) for k in keep) == ADA.target_r * len(keep)
    assert len({int(k.sum()) for k in keep}) > 1  # ranks moved between layers
    # ... the pruned singular values are exactly 0 and the exported pattern is the allocator's.
    trained = compiled.model_of(final["params"])
    exported = np.concatenate([rank_kept(lin) for _, _, lin in decoder_linears(trained)
                               if lin.lora_e is not None])  # fmt: skip
    np.testing.assert_array_equal(exported, np.concatenate(keep))
    # Resumed from a checkpoint in the middle of the schedule equals uninterrupted.
    half, _ = _run(jax.device_put(initial, compiled.state_shardings), compiled, range(5))
    checkpoints = Checkpoints(tmp_path / "ckpt", keep_last=1, keep_best=0, async_save=False)
    checkpoints.save(5, half, {}, train_config(), None, {})
    checkpoints.wait()
    restored = checkpoints.restore(5, sharding.abstract_like(final))[0]
    resumed, _ = _run(restored, compiled, range(5, total))
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(final), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


ADAPTER_CONFIG_ERRORS = [
    ({"use_dora": True, "rank": 0}, "lora.use_dora", "set lora.rank > 0"),
    ({"method": "adalora", "use_dora": True}, "lora.use_dora", "does not support DoRA"),
    ({"method": "adalora", "use_rslora": True}, "lora.use_rslora", "rsLoRA does not apply"),
    ({"method": "adapter"}, "lora.method", "expected one of"),
    ({"method": "adalora", "adalora.target_r": 9}, "lora.adalora.target_r", "within [1, "),
    ({"method": "adalora", "adalora.tinit": 790, "adalora.tfinal": 10}, "lora.adalora.tinit",
     "leave no updates to reallocate ranks"),
    ({"method": "adalora", "adalora.beta1": 1.0}, "lora.adalora.beta1", "within (0, 1)"),
]  # fmt: skip


@pytest.mark.parametrize("changes,field,message", ADAPTER_CONFIG_ERRORS)
def test_bad_dora_and_adalora_settings_are_named(changes, field, message):
    import re
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from configs import base
    from sft_jax.core.errors import ConfigError
    from sft_jax.train.config_check import check_values

    config = base.get_config().unlock()
    config.lora.rank = 8
    for name, value in changes.items():
        section, _, field_name = name.rpartition(".")
        (config.lora.adalora if section else config.lora)[field_name] = value
    with pytest.raises(ConfigError, match=f"config.{re.escape(field)}=.*{re.escape(message)}"):
        check_values(RunSpec.of(config), 8, 8)
    config = base.get_config().unlock()
    config.lora.rank, config.lora.use_dora, config.lora.quantize = 8, True, "nf4"
    check_values(RunSpec.of(config), 8, 8)  # DoRA on a quantized base, as PEFT allows


@pytest.mark.e2e
@pytest.mark.parametrize(
    "method",
    [["--config.lora.use_dora=True"],
     ["--config.lora.method=adalora", "--config.lora.adalora.target_r=4",
      "--config.lora.adalora.tinit=5", "--config.lora.adalora.tfinal=10",
      "--config.lora.adalora.delta_t=5",
      # P, Q ~ N(0, 0.02) and Lambda = 0 (PEFT's init) start slowly: a higher rate for 30 steps.
      "--config.train.learning_rate=2e-2"]],
    ids=["dora", "adalora"],
)  # fmt: skip
def test_demo_trains_and_exports_a_peft_adapter(tmp_path, method):
    from test_demo import logged, run_demo

    # 30 steps (the last of run_demo's overrides win): adapters on the demo's random-weight
    # model learn slower than full fine-tuning; exact match needs far more steps
    # (benchmarks/bench_peft.py shows it rise).
    shorter = ["--config.train.steps=30", "--config.data.eval_max_examples=32",
               "--config.eval.generate_examples=4"]  # fmt: skip
    adapters = ["--config.lora.rank=8", "--config.lora.alpha=16", "--config.export.at_end=last"]
    run_demo(tmp_path / "run", *shorter, *adapters, *method)
    evals = [r for r in logged(tmp_path / "run") if "eval/loss" in r]
    assert [r["step"] for r in evals] == [0, 30]
    assert evals[-1]["eval/loss"] < 0.92 * evals[0]["eval/loss"]
    config = json.loads((tmp_path / "run/export/adapter/adapter_config.json").read_text())
    if "adalora" in method[0]:  # init_r 8 -> an average of 4 kept over the adapted layers
        assert config["peft_type"] == "ADALORA"
        kept = [sum(pattern) for pattern in config["rank_pattern"].values()]
        assert sum(kept) == 4 * len(kept)
    else:
        assert config["peft_type"] == "LORA" and config["use_dora"]


def test_dora_on_a_quantized_base_starts_at_the_base_and_merges():
    """QLoRA + DoRA (PEFT allows it): the magnitudes are the dequantized kernel's column norms,
    so the fresh model computes as its quantized base, and merging folds the same function."""
    from sft_jax.models.quantize import QuantSpec

    quant = QuantSpec("int8", 32, double_quant=True)
    spec = LoRASpec(rank=4, alpha=8.0, targets=TARGETS, use_dora=True, quantization=quant)
    path, mesh = build_and_save_llama(), sharding.single_device_mesh()
    base_model = from_pretrained(path, mesh=mesh, quantization=quant)
    batch = padded_batch()
    expected = jax_logits(base_model, batch)
    apply_lora(base_model, spec, mesh)
    np.testing.assert_allclose(jax_logits(base_model, batch), expected, atol=1e-5)
    trained_looking(base_model)
    adapted_logits = jax_logits(base_model, batch)
    merged_logits = jax_logits(fold_adapters(base_model), batch)
    assert_close_on_tokens(merged_logits, adapted_logits, batch["attention_mask"], 1e-5)


@pytest.mark.parametrize("spec", [DORA, ADALORA], ids=["dora", "adalora"])
def test_dora_and_adalora_on_fsdp_tensor_mesh_equal_single_device(spec):
    def three_steps(mesh):
        state, compiled = _adalora_steps(adapted(build_and_save_llama(), spec, mesh), mesh, spec)
        return _run(state, compiled, range(3))[0]["params"]

    single = three_steps(sharding.single_device_mesh())
    sharded = three_steps(sharding.make_mesh(1, 4, 2))
    # Adam divides each gradient by its own scale, so a weight whose gradients are tiny moves as
    # far as any other and reduction-order noise in them shows up in full: compare each leaf
    # against its own largest value (a sharding error moves leaves by O(1) of it).
    for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(single), strict=True):
        scale = float(np.max(np.abs(np.asarray(b)))) or 1.0
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=1e-3 * scale)


@pytest.mark.parametrize(
    "overrides",
    [{"prompt.method": "prompt_tuning"}, {"lora.rank": 4, "lora.use_dora": True},
     {"lora.rank": 4, "lora.method": "adalora", "lora.adalora.target_r": 2}],
    ids=["prompt_tuning", "dora", "adalora"],
)  # fmt: skip
def test_planner_counts_the_state_training_holds(overrides):
    """The planner's abstract model and optimizer (plan_estimate) hold, per device, the bytes of
    the trained parameters, optimizer state (AdaLoRA's allocator included) and frozen weights
    that training builds (model_setup.build_model, compile_plan.init_state)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from configs import base
    from sft_jax.planning.estimate import abstract_run_model, model_config, shard_bytes, state_parts
    from sft_jax.train.compiled import run_optimizer
    from sft_jax.train.setup import build_model

    config = base.get_config().unlock()
    config.model.name_or_path = str(build_and_save_llama())
    for dotted, value in overrides.items():
        *groups, name = dotted.split(".")
        node = config
        for group in groups:
            node = node[group]
        node[name] = value
    mesh = sharding.single_device_mesh()
    model, _, trainable = build_model(RunSpec.of(config), mesh)
    spec = RunSpec.of(config)
    state, _ = init_state(model, run_optimizer(spec)[0], mesh, trainable)
    frozen = jax.device_put(nnx.to_pure_dict(nnx.state(model, nnx.Not(trainable))))
    real = {"params": state["params"], "opt_state": state["opt_state"], "frozen": frozen}
    planned = state_parts(spec, *abstract_run_model(spec, model_config(spec)), mesh)
    assert planned == {part: shard_bytes(tree) for part, tree in real.items()}
    assert planned["params"] < planned["frozen"] / 5  # not planned as full fine-tuning
