"""LoRA / QLoRA: PEFT parity, merged export, frozen base, memory, quantization error, sharding."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import transformers
from flax import nnx
from hf_models import hf_logits, save_hf_model
from test_models import assert_close_on_tokens, jax_logits, padded_batch
from test_step import ROWS, SEQ_LEN, synthetic_batch, train_config

from sft_jax.adapters.lora import LoRASpec, apply_lora, save_adapter, trainable_filter
from sft_jax.adapters.lora import merged as fold_adapters
from sft_jax.models import from_pretrained, save_pretrained
from sft_jax.models.decoder import decoder_linears
from sft_jax.models.layers import LoRAParam
from sft_jax.models.quantize import QuantSpec, dequantize, quantize, stored_bytes
from sft_jax.train import sharding
from sft_jax.train.compiled import build_steps, init_state
from sft_jax.train.optim import make_optimizer
from sft_jax.train.sharding import device_batch
from sft_jax.train.step import StepOptions

SPEC = LoRASpec(rank=4, alpha=8.0, extra_trainable=("embed",))


@pytest.fixture(scope="module", params=["llama3.1", "qwen2"])
def base(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param.replace(".", "_"))
    save_hf_model(request.param, path)
    return path


def lora_model(path, spec=SPEC, mesh=None, **kwargs):
    mesh = mesh or sharding.single_device_mesh()
    model = from_pretrained(path, mesh=mesh, **kwargs)
    apply_lora(model, spec, mesh)
    return model


def randomize_adapters(model, seed: int = 1) -> None:
    """Trained-looking adapters (B != 0) and a changed embedding, as after fine-tuning."""
    keys = iter(jax.random.split(jax.random.key(seed), 200))
    for _, _, linear in decoder_linears(model):
        if linear.lora_b is not None:
            linear.lora_b[...] = 0.3 * jax.random.normal(next(keys), linear.lora_b[...].shape)
    model.embed[...] = model.embed[...] + 0.05 * jax.random.normal(
        next(keys), model.embed[...].shape
    )


def test_fresh_lora_leaves_logits_unchanged(base):
    batch = padded_batch()
    plain = jax_logits(from_pretrained(base), batch)
    np.testing.assert_array_equal(jax_logits(lora_model(base), batch), plain)


RSLORA_HEAD = LoRASpec(rank=8, alpha=16.0, targets=("q_proj", "v_proj", "down_proj"),
                       use_rslora=True, extra_trainable=("lm_head",))  # fmt: skip


@pytest.mark.parametrize("spec", [SPEC, RSLORA_HEAD], ids=["embed", "rslora_some_lm_head"])
def test_adapter_loads_in_peft_with_equal_logits(base, tmp_path, spec):
    model = from_pretrained(base, mesh=sharding.single_device_mesh())
    spec = spec.for_model(model)  # as the trainer does: a tied head is the embedding
    apply_lora(model, spec, sharding.single_device_mesh())
    randomize_adapters(model)
    if "lm_head" in spec.extra_trainable:  # untied: the head is what trains, not the embedding
        model.embed[...] = from_pretrained(base).embed[...]
        model.lm_head[...] = model.lm_head[...] * 1.3
    save_adapter(model, tmp_path / "adapter", spec, base_model=str(base))
    hf_base = transformers.AutoModelForCausalLM.from_pretrained(base, attn_implementation="eager")
    peft_model = peft.PeftModel.from_pretrained(hf_base, tmp_path / "adapter").eval()
    batch = padded_batch(seed=3)
    expected = hf_logits(peft_model, batch["input_ids"], batch["attention_mask"])
    actual = jax_logits(model, batch)
    assert_close_on_tokens(actual, expected, batch["attention_mask"], rel_tol=1e-4)
    # ... and the merged export equals it too, loaded as a plain transformers model.
    merged_dir = save_pretrained(fold_adapters(model), tmp_path / "merged")
    merged = transformers.AutoModelForCausalLM.from_pretrained(
        merged_dir, attn_implementation="eager"
    )
    merged_logits = hf_logits(merged.eval(), batch["input_ids"], batch["attention_mask"])
    assert_close_on_tokens(merged_logits, expected, batch["attention_mask"], rel_tol=1e-4)


def _train(model, trainable, mesh, steps: int, seeds=None):
    tx, schedule = make_optimizer(train_config(learning_rate=3e-2, weight_decay=0.0))
    state, shardings = init_state(model, tx, mesh, trainable)
    compiled = build_steps(
        model, tx, schedule, mesh, shardings, train_rows=ROWS, eval_rows=ROWS, seq_len=SEQ_LEN,
        options=StepOptions(loss_chunk_size=4), trainable=trainable,
    )  # fmt: skip
    losses = []
    for step in range(steps):
        batch = synthetic_batch(seeds[step] if seeds else 0)
        state, metrics = compiled.train(state, device_batch(batch, compiled.batch_shardings))
        losses.append(float(metrics["train/loss"]))
    return state, compiled, losses


def _bytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def test_only_adapters_train_and_the_base_stays_bitwise(base):
    mesh = sharding.single_device_mesh()
    spec = LoRASpec(rank=4, alpha=8.0)
    model = lora_model(base, spec)
    before = {
        p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }
    state, compiled, losses = _train(model, trainable_filter(spec), mesh, steps=8)
    assert losses[-1] < 0.7 * losses[0]
    frozen = dict(nnx.to_flat_state(nnx.state(model, nnx.Not(LoRAParam))))
    flat_frozen = {tuple(p): v for p, v in jax.tree_util.tree_flatten_with_path(compiled.frozen)[0]}
    assert len(flat_frozen) == len(frozen)
    for path, value in jax.tree_util.tree_flatten_with_path(compiled.frozen)[0]:
        key = tuple(getattr(k, "key", getattr(k, "idx", None)) for k in path)
        np.testing.assert_array_equal(np.asarray(value), before[key])
    # Memory: optimizer state is proportional to the adapters, not the model.
    adapters, opt = _bytes(state["params"]), _bytes(state["opt_state"])
    full_state, _ = init_state(from_pretrained(base), *make_optimizer(train_config())[:1], mesh)
    print(f"\nLoRA r=4: params {adapters} B, opt {opt} B; full: params "
          f"{_bytes(full_state['params'])} B, opt {_bytes(full_state['opt_state'])} B")  # fmt: skip
    assert opt <= 2 * adapters + 64
    assert opt < 0.2 * _bytes(full_state["opt_state"])


def test_training_the_lm_head_of_a_tied_model_trains_the_embedding(base):
    spec = LoRASpec(rank=4, alpha=8.0, extra_trainable=("lm_head",))
    model = lora_model(base, spec)
    resolved = spec.for_model(model)
    trained = nnx.state(model, trainable_filter(resolved))
    full = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(trained)
            if not isinstance(_, LoRAParam)}  # fmt: skip
    if model.lm_head is None:  # tied (qwen2): the embedding is the head
        assert resolved.extra_trainable == ("embed",) and full == {"embed"}
    else:
        assert resolved == spec and full == {"lm_head"}


def test_lora_on_fsdp_tensor_mesh_equals_single_device(base):
    spec = LoRASpec(rank=4, alpha=8.0, dropout=0.1)
    seeds = [0, 1, 2]
    single = _train(
        lora_model(base, spec), trainable_filter(spec), sharding.single_device_mesh(), 3, seeds
    )
    mesh = sharding.make_mesh(1, 4, 2)
    sharded = _train(lora_model(base, spec, mesh=mesh), trainable_filter(spec), mesh, 3, seeds)
    np.testing.assert_allclose(sharded[2], single[2], rtol=2e-5)


def _relative_rms(actual: np.ndarray, reference: np.ndarray) -> float:
    return float(np.sqrt(np.mean((actual - reference) ** 2) / np.mean(reference**2)))


# Documented tolerances, relative RMS of logits against the bf16 model, measured on these tiny
# random-weight models (no redundancy: every weight is signal, so 4-bit codes show): nf4
# 0.26-0.31, int8 ~0.02, while bf16 itself is ~0.01 from fp32. Pretrained models, whose weights
# are near-Gaussian with outliers spread over wide layers, lose far less.
QUANT_TOLERANCE = {"nf4": 0.35, "int8": 0.03}
QUANT_BYTES = {"nf4": (0.5, 0.56), "int8": (1.0, 1.06)}


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_qlora_bytes_error_and_learning(base, fmt):
    spec = LoRASpec(rank=4, alpha=8.0, quantization=QuantSpec(fmt, 32, double_quant=True))
    model = lora_model(base, spec, quantization=spec.quantization)
    weights, stored = 0, 0
    for _, _, linear in decoder_linears(model):
        assert linear.kernel is None
        weights += linear.in_features * linear.out_features
        stored += stored_bytes({k: v[...] for k, v in linear.quant.items()})
    low, high = QUANT_BYTES[fmt]
    assert low < stored / weights < high, stored / weights
    print(f"\n{fmt}: {stored / weights:.4f} bytes per weight")

    # Mechanism: exactly the fp32 model whose kernels went through quantize -> dequantize.
    batch = padded_batch()
    valid = batch["attention_mask"].astype(bool)
    simulated = from_pretrained(base)
    for _, _, linear in decoder_linears(simulated):
        linear.kernel[...] = dequantize(
            quantize(linear.kernel[...], spec.quantization), spec.quantization, jnp.float32
        )
    quantized_logits = jax_logits(model, batch)
    assert_close_on_tokens(quantized_logits, jax_logits(simulated, batch), valid, rel_tol=1e-5)
    # Inherent error, against the bf16 model.
    reference = jax_logits(from_pretrained(base, param_dtype=jnp.bfloat16), batch)
    error = _relative_rms(quantized_logits[valid], reference[valid])
    print(f"{fmt}: logits relative RMS error vs bf16 {error:.3f}")
    assert error < QUANT_TOLERANCE[fmt]
    _, _, losses = _train(model, trainable_filter(spec), sharding.single_device_mesh(), steps=8)
    assert losses[-1] < 0.7 * losses[0]
