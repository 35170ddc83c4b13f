"""gpt-oss: attention sinks (training forward and KV-cache decode), biased router and experts,
softmax over the top-k logits, the clamped SwiGLU, the fused gate_up_proj layout. Logit parity
(fp32 padded, packed, bf16) and the export round trip run in test_models.py (gpt_oss is in
hf_models.FAMILIES); here: what the config reads, that each new part shows in the logits,
greedy generation, loss + load-balancing loss and gradients against transformers, a sharded
mesh against one device, LoRA against PEFT, and what is refused."""

from __future__ import annotations

import logging

import jax
import numpy as np
import peft
import pytest
import torch
import transformers
from flax import nnx
from hf_models import hf_config, transformers_greedy
from safetensors import safe_open
from test_models import assert_close_on_tokens, jax_logits, padded_batch
from test_moe import _hf_loss_and_grads, _labelled_batch, _merged_export_logits
from test_smollm3_olmo3 import EOS, NEW_TOKENS, PROMPTS
from test_step import synthetic_batch

from sft_jax.adapters.lora import LoRASpec, apply_lora, save_adapter
from sft_jax.core.errors import ConfigError
from sft_jax.generation.sampler import generate
from sft_jax.models import UnsupportedModelError, from_hf_config, from_pretrained, save_pretrained
from sft_jax.models.decoder import decoder_linears, use_attention
from sft_jax.models.kernels import blockwise
from sft_jax.train import sharding
from sft_jax.train.kernel_choice import choose_attention
from sft_jax.train.step import StepOptions


def test_config_reads_every_gpt_oss_field():
    config = from_hf_config(hf_config("gpt_oss"))
    assert config.attention_sinks and config.qkv_bias and config.o_bias
    assert config.layer_types == ("sliding_attention", "full_attention", "sliding_attention")
    assert [config.window_for(i) for i in range(3)] == [5, None, 5]
    rope = config.rope_for("full_attention")
    assert (rope.rope_type, rope.factor, rope.truncate) == ("yarn", 4.0, False)
    assert config.rope_for("sliding_attention") == rope
    assert (config.num_experts, config.experts_per_token, config.moe_intermediate_size) == (
        4,
        2,
        32,
    )
    assert config.moe_layers == (0, 1, 2) and config.expert_names == "gpt_oss"
    assert (config.swiglu_alpha, config.swiglu_limit) == (1.702, 0.6)
    assert config.router_aux_loss_coef == 0.02
    real = from_hf_config(transformers.GptOssConfig(num_hidden_layers=4))  # the 20b defaults
    assert real.swiglu_limit == 7.0 and real.sliding_window == 128
    assert real.rope_for("full_attention").attention_factor == pytest.approx(1.3465735902799727)


def test_each_new_part_shows_in_the_logits(hf_checkpoint):
    """Dropping the sinks or the SwiGLU clamp moves the logits well beyond the parity
    tolerance: the parity tests see both (the biases' gradients are checked below)."""
    path, _ = hf_checkpoint("gpt_oss")
    batch = padded_batch()
    model = from_pretrained(path)
    reference = jax_logits(model, batch)

    def changed(edit) -> np.ndarray:
        variant = from_pretrained(path)
        for layer in variant.layers:
            edit(layer)
        return jax_logits(variant, batch)

    edits = {
        "sinks": lambda layer: setattr(layer.attn, "sinks", None),
        "clamp": lambda layer: setattr(layer.mlp, "limit", 1e6),
    }
    valid = batch["attention_mask"].astype(bool)
    scale = np.abs(reference[valid]).max()
    for name, edit in edits.items():
        moved = np.abs(changed(edit)[valid] - reference[valid]).max()
        assert moved > 1e-2 * scale, f"{name}: logits moved by {moved:.3g} only"


def test_greedy_generation_equals_transformers(hf_checkpoint):
    """The KV-cache decode path with sinks, past the 5-token windows, token for token."""
    path, hf_model = hf_checkpoint("gpt_oss")
    actual = generate(
        from_pretrained(path), PROMPTS, max_new_tokens=NEW_TOKENS, stop_token_ids=[EOS]
    )
    expected = transformers_greedy(hf_model, PROMPTS, NEW_TOKENS, EOS)
    assert actual == expected
    assert sum(map(len, expected)) > 2 * len(PROMPTS)  # not all stopped at once


def test_export_writes_the_fused_checkpoint_layout(hf_checkpoint, tmp_path, caplog):
    """Every tensor of transformers' save_pretrained is read (none unused) and our export
    writes the same names, shapes and, unchanged, the same values (gate_up interleaved)."""
    path, _ = hf_checkpoint("gpt_oss")
    with caplog.at_level(logging.WARNING):
        model = from_pretrained(path)
    assert "not used" not in caplog.text
    out = save_pretrained(model, tmp_path / "export")
    with (
        safe_open(path / "model.safetensors", "np") as theirs,
        safe_open(out / "model.safetensors", "np") as ours,
    ):
        names = set(theirs.keys())
        assert set(ours.keys()) == names
        assert "model.layers.1.mlp.experts.gate_up_proj" in names
        for name in names:
            np.testing.assert_array_equal(ours.get_tensor(name), theirs.get_tensor(name), name)


def _loss_and_grads(model, batch):
    objective = StepOptions(
        moe_layers=model.config.moe_layers,
        router_aux_loss_coef=model.config.router_aux_loss_coef,
        loss_chunk_size=4,
    ).objective()
    graphdef, params = nnx.split(model)

    def loss(params):
        sums = objective.sums(nnx.merge(graphdef, params), batch)
        return objective.loss(sums, objective.normalizer(batch)), sums.aux

    (value, aux), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return value, aux, grads


@pytest.fixture(scope="module")
def one_device(hf_checkpoint):
    """(batch, labels, loss, aux loss, gradients) of the tiny gpt-oss on one device."""
    path, _ = hf_checkpoint("gpt_oss")
    batch, labels = _labelled_batch()
    return batch, labels, *_loss_and_grads(from_pretrained(path), batch)


def test_loss_aux_and_gradients_equal_transformers(hf_checkpoint, one_device):
    """CE + coef * load-balancing loss and the gradients of the new parameters (sinks, router
    weight and bias, fused gate_up and its bias, down and its bias) equal transformers'."""
    _, hf_model = hf_checkpoint("gpt_oss")
    batch, labels, value, aux, grads = one_device
    out, hf_grads = _hf_loss_and_grads(hf_model, batch, labels)
    np.testing.assert_allclose(value, out.loss.item(), rtol=1e-5)
    np.testing.assert_allclose(aux, out.aux_loss.item(), rtol=1e-5)
    for layer in range(3):
        mlp, prefix = grads["layers"][layer]["mlp"], f"model.layers.{layer}"

        def interleave(gate, up):
            fused = np.empty((*gate.shape[:-1], 2 * gate.shape[-1]), np.float32)
            fused[..., 0::2], fused[..., 1::2] = gate, up
            return fused

        ours = {
            "self_attn.sinks": grads["layers"][layer]["attn"]["sinks"][...],
            "self_attn.q_proj.bias": grads["layers"][layer]["attn"]["q_proj"]["bias"][...],
            "mlp.router.weight": mlp["router"][...].T,
            "mlp.router.bias": mlp["router_logit_bias"][...],
            "mlp.experts.gate_up_proj": interleave(mlp["experts_gate"], mlp["experts_up"]),
            "mlp.experts.gate_up_proj_bias": interleave(
                mlp["experts_gate_bias"], mlp["experts_up_bias"]
            ),
            "mlp.experts.down_proj": mlp["experts_down"][...],
            "mlp.experts.down_proj_bias": mlp["experts_down_bias"][...],
        }
        for name, grad in ours.items():
            expected = hf_grads[f"{prefix}.{name}"]
            assert np.abs(expected).max() > 0, name
            np.testing.assert_allclose(grad, expected, rtol=1e-3, atol=1e-6, err_msg=name)


def test_fsdp_tensor_expert_mesh_equals_one_device(hf_checkpoint, one_device):
    """Loaded onto fsdp=2 x tensor=2 x expert=2 (8 devices): loss, load-balancing loss and every
    gradient equal one device's."""
    path, _ = hf_checkpoint("gpt_oss")
    batch, _, *expected = one_device
    mesh = sharding.make_mesh(fsdp=2, tensor=2, expert=2)
    model = from_pretrained(path, mesh=mesh)
    gate = model.layers[0].mlp.experts_gate[...]
    assert gate.sharding.spec == jax.sharding.PartitionSpec("expert", "fsdp", "tensor")
    with jax.set_mesh(mesh):
        actual = _loss_and_grads(model, batch)
    np.testing.assert_allclose(actual[0], expected[0], rtol=1e-5)
    np.testing.assert_allclose(actual[1], expected[1], rtol=1e-5)
    flat_expected = dict(nnx.to_flat_state(expected[2]))
    for key, grad in nnx.to_flat_state(actual[2]):
        np.testing.assert_allclose(
            np.asarray(grad.get_value()),
            np.asarray(flat_expected[key].get_value()),
            rtol=1e-4,
            atol=1e-6,
            err_msg="/".join(map(str, key)),
        )


def test_lora_on_attention_equals_peft_and_the_merged_export(hf_checkpoint, tmp_path):
    """LoRA on q/k/v/o_proj (PEFT's module names in GptOssAttention; peft has no default
    targets for gpt_oss): the PEFT adapter loaded by peft and our merged export loaded by
    transformers both give our logits."""
    path, _ = hf_checkpoint("gpt_oss")
    mesh = sharding.single_device_mesh()
    model = from_pretrained(path, mesh=mesh)
    spec = LoRASpec(rank=4, alpha=8.0, targets=("q_proj", "k_proj", "v_proj", "o_proj"))
    apply_lora(model, spec, mesh)
    keys = iter(jax.random.split(jax.random.key(1), 64))
    for _, _, linear in decoder_linears(model):
        if linear.lora_b is not None:
            linear.lora_b[...] = 0.3 * jax.random.normal(next(keys), linear.lora_b[...].shape)
    batch = padded_batch(seed=3)
    actual = jax_logits(model, batch)
    save_adapter(model, tmp_path / "adapter", spec, base_model=str(path))
    hf_base = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
    peft_model = peft.PeftModel.from_pretrained(hf_base, tmp_path / "adapter").eval()
    with torch.no_grad():
        ids = torch.as_tensor(batch["input_ids"], dtype=torch.long)
        mask = torch.as_tensor(batch["attention_mask"])
        expected = peft_model(input_ids=ids, attention_mask=mask).logits.numpy()
    assert_close_on_tokens(actual, expected, batch["attention_mask"], rel_tol=1e-4)
    merged_logits = _merged_export_logits(model, tmp_path / "merged", batch)
    assert_close_on_tokens(merged_logits, actual, batch["attention_mask"], rel_tol=1e-4)


def test_what_sft_jax_cannot_run_is_refused(hf_checkpoint, tmp_path):
    """A quantized checkpoint other than MXFP4 experts (test_gpt_oss_mxfp4.py) is refused from
    config.json alone; a kernel without sinks is refused when the model runs."""
    config = hf_config("gpt_oss")
    config.quantization_config = {"quant_method": "fp8", "modules_to_not_convert": []}
    config.save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match=r"quantization_config.*'fp8'.*dequantize"):
        from_pretrained(tmp_path)
    path, _ = hf_checkpoint("gpt_oss")
    model = from_pretrained(path)
    use_attention(model, "cudnn")
    with pytest.raises(UnsupportedModelError, match=r"'cudnn' has no attention sinks"):
        jax_logits(model, padded_batch())


def test_blockwise_with_sinks_equals_the_einsum_path(hf_checkpoint, monkeypatch):
    """The flash-style kernel with sinks (output scaled by sigmoid(lse - sink), the lse's
    cotangent in its backward pass) in blocks of 4 tokens, windows of 5: loss and every
    gradient, the sinks' included, equal the einsum path's, on rows of two packed documents
    and padding."""
    monkeypatch.setitem(blockwise.BLOCK, "tokens", 4)
    path, _ = hf_checkpoint("gpt_oss")
    batch = synthetic_batch(1, rows=2)
    assert (batch["segment_ids"] == 2).any() and (batch["segment_ids"] == 0).any()
    model = from_pretrained(path)
    expected = _loss_and_grads(model, batch)
    use_attention(model, "blockwise")
    actual = _loss_and_grads(model, batch)
    np.testing.assert_allclose(actual[0], expected[0], rtol=1e-5)
    flat_expected = dict(nnx.to_flat_state(expected[2]))
    for key, grad in nnx.to_flat_state(actual[2]):
        np.testing.assert_allclose(
            np.asarray(grad.get_value()),
            np.asarray(flat_expected[key].get_value()),
            rtol=1e-4,
            atol=1e-6,
            err_msg="/".join(map(str, key)),
        )
    sinks_grad = actual[2]["layers"][1]["attn"]["sinks"][...]
    assert np.abs(sinks_grad).min() > 0


def test_auto_attention_picks_a_kernel_with_sinks():
    """'auto' takes blockwise on GPUs and TPUs (xla with a context axis, whose blockwise
    shards have no sinks); naming cuDNN or splash is refused, saying why."""
    shape = from_hf_config(hf_config("gpt_oss"))
    options = {"model": shape, "compute_dtype": "bfloat16", "max_length": 4096}
    for accelerator in ("nvidia", "tpu"):
        kind, why = choose_attention("auto", accelerator=accelerator, **options)
        assert kind == "blockwise" and "attention sinks" in why, accelerator
        kind, why = choose_attention("auto", accelerator=accelerator, context=2, **options)
        assert kind == "xla" and "sinks" in why, accelerator
    for kind in ("cudnn", "splash"):
        with pytest.raises(ConfigError, match=rf"attention='{kind}' cannot run: .*sinks"):
            choose_attention(kind, accelerator="nvidia", **options)
    with pytest.raises(ConfigError, match=r"'blockwise' cannot run .*mesh.context=2.*sinks"):
        choose_attention("blockwise", accelerator="nvidia", context=2, **options)
