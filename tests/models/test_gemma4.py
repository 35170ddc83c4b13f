"""Gemma 4 (text): what sets it apart is read from config.json, greedy generation with its
shared KV cache equals transformers', the export writes the checkpoint's own tensor names, a
variant without PLE, sharing or k_eq_v matches too, sharded training equals one device's, and
the expert block (enable_moe_block) matches too, and what sft_jax does not implement is
refused by name. Logit parity, packing, bf16 and the export
round trip of the tiny model run in test_models.py (it is in hf_models.FAMILIES)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from hf_models import (
    build_hf_model,
    hf_config,
    hf_logits,
    randomize_,
    save_hf_model,
    transformers_greedy,
)
from safetensors import safe_open
from test_models import assert_close_on_tokens, jax_logits, padded_batch
from test_step import synthetic_batch

from sft_jax.adapters.lora import LoRASpec, apply_lora, merged
from sft_jax.generation.sampler import generate
from sft_jax.models import UnsupportedModelError, from_hf_config, from_pretrained, save_pretrained
from sft_jax.models.decoder import CausalLM, decoder_linears
from sft_jax.objectives.loss import loss_sums
from sft_jax.train import sharding

EOS = 2
# Different lengths; with 12 new tokens every row outgrows the 5-token windows.
PROMPTS = [[1, 17, 33, 5, 80, 9, 64, 101, 12], [1, 40, 7], [1, 90, 91, 3, 55, 28]]
NEW_TOKENS = 12
MOE = {"enable_moe_block": True, "num_experts": 4, "top_k_experts": 2, "moe_intermediate_size": 32}


def test_reads_per_layer_shapes_sharing_and_ple():
    config = from_hf_config(hf_config("gemma4"))
    assert config.layer_head_dims == (16, 32, 16, 32)  # full layers: global_head_dim
    assert config.layer_kv_heads == (2, 1, 2, 1)  # full layers: num_global_key_value_heads
    assert config.kv_sources == (0, 1, 0, 1)  # the last two share layers 0 and 1's K/V
    assert config.layer_mlp_widths == (96, 96, 192, 192)  # double-wide where shared
    assert config.value_is_key_layers == (1,)  # k_eq_v: full layers computing their own K/V
    assert (config.per_layer_input_size, config.per_layer_vocab_size) == (8, 128)
    assert config.query_scale == 1.0 and not config.gemma_norms and config.v_norm
    full = config.rope_for("full_attention")
    assert (full.rope_type, full.partial_rotary_factor) == ("proportional", 0.25)
    inv_freq = full.inverse_frequencies(32)
    assert np.count_nonzero(inv_freq) == 4 and inv_freq.shape == (16,)


def test_greedy_equals_transformers(tmp_path):
    """The KV cache of the shared layers is their source layer's (sliding and full); the
    tiny model has every Gemma 4 feature on, the expert block included."""
    hf_model = save_hf_model("gemma4", tmp_path, **MOE)
    path = tmp_path
    actual = generate(
        from_pretrained(path), PROMPTS, max_new_tokens=NEW_TOKENS, stop_token_ids=[EOS]
    )
    expected = transformers_greedy(hf_model, PROMPTS, NEW_TOKENS, EOS)
    assert actual == expected


def test_export_writes_the_checkpoint_tensor_names(hf_checkpoint, tmp_path):
    path, _ = hf_checkpoint("gemma4")
    out = save_pretrained(from_pretrained(path), tmp_path / "export")

    def tensors(directory) -> dict[str, np.ndarray]:
        with safe_open(directory / "model.safetensors", "np") as f:
            return {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118

    exported, original = tensors(out), tensors(path)
    assert set(exported) == set(original)
    assert "model.layers.2.self_attn.k_proj.weight" not in exported  # shared: none
    assert "model.layers.1.self_attn.v_proj.weight" not in exported  # k_eq_v: none
    for name in ("model.layers.3.layer_scalar", "model.embed_tokens_per_layer.weight"):
        np.testing.assert_array_equal(exported[name], original[name])


def test_variant_without_ple_sharing_or_k_eq_v_matches(tmp_path):
    """The other branch of every Gemma 4 feature: own K/V in every layer, a v_proj on full
    layers, no per-layer inputs, single-wide MLPs."""
    hf_model = build_hf_model(
        "gemma4",
        seed=1,
        num_kv_shared_layers=0,
        attention_k_eq_v=False,
        hidden_size_per_layer_input=0,
    )
    hf_model.save_pretrained(tmp_path)
    model = from_pretrained(tmp_path)
    assert model.per_layer_embed is None and model.layers[1].attn.v_proj is not None
    batch = padded_batch()
    expected = hf_logits(hf_model, batch["input_ids"], batch["attention_mask"])
    assert_close_on_tokens(jax_logits(model, batch), expected, batch["attention_mask"], 1e-4)


def test_fsdp_tensor_mesh_equals_single_device():
    """Loss and gradients of packed, padded rows (every Gemma 4 feature on, the expert block
    included) on a 2 (fsdp) x 2 (expert) x 2 (tensor) mesh equal one device's: every gradient
    within 1e-4 of its largest entry."""
    model = CausalLM(from_hf_config(hf_config("gemma4", **MOE)), rngs=nnx.Rngs(0))
    batch = synthetic_batch(0)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    frozen = nnx.to_pure_dict(rest)  # the layer scalars: buffers, never trained

    def loss(params):
        sums = loss_sums(nnx.merge(graphdef, params, frozen), batch, max_chunk=4)
        return sums.nll / sums.target_tokens

    value_and_grad = jax.jit(jax.value_and_grad(loss))
    expected_loss, expected = value_and_grad(nnx.to_pure_dict(params))
    mesh = sharding.make_mesh(fsdp=2, expert=2, tensor=2)
    placed = jax.device_put(nnx.to_pure_dict(params), sharding.param_shardings(model, mesh))
    with jax.set_mesh(mesh):
        actual_loss, actual = value_and_grad(placed)
    assert "layer_scalar" in frozen["layers"][0] and "layer_scalar" not in actual["layers"][0]
    np.testing.assert_allclose(actual_loss, expected_loss, rtol=1e-5)
    pairs = zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True)
    for gradient, reference in pairs:
        error = np.abs(np.asarray(gradient) - np.asarray(reference)).max()
        assert error <= 1e-4 * np.abs(np.asarray(reference)).max()
    experts = placed["layers"][0]["experts"]["gate_up"]
    assert experts.sharding.spec[0] == "expert"


def test_multimodal_checkpoint_loads_its_text_model(tmp_path):
    """A Gemma4ForConditionalGeneration checkpoint (model_type "gemma4", text_config, tensors
    under model.language_model.) loads as its text model: logits equal the multimodal model's
    on text; the export is the text-only causal LM (gemma4_text), which transformers loads with
    equal logits."""
    text = hf_config("gemma4")
    config = transformers.Gemma4Config(
        text_config=text.to_dict(), vision_config=None, audio_config=None
    )
    torch.manual_seed(0)
    hf_model = transformers.Gemma4ForConditionalGeneration(config)
    randomize_(hf_model.model.language_model, seed=2)
    hf_model.eval().save_pretrained(tmp_path / "multimodal")
    model = from_pretrained(tmp_path / "multimodal")
    assert model.config.model_type == "gemma4_text"
    batch = padded_batch()
    expected = hf_logits(hf_model, batch["input_ids"], batch["attention_mask"])
    assert_close_on_tokens(jax_logits(model, batch), expected, batch["attention_mask"], 1e-4)
    out = save_pretrained(model, tmp_path / "export")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
    assert reloaded.config.model_type == "gemma4_text"
    again = hf_logits(reloaded.float().eval(), batch["input_ids"], batch["attention_mask"])
    assert_close_on_tokens(again, expected, batch["attention_mask"], 1e-4)


def test_expert_block_matches_transformers(tmp_path):
    """enable_moe_block (26B-A4B's layout, tiny): padded and packed logits equal transformers',
    and transformers reloads the export (fused gate_up_proj, router scales) with equal logits."""
    hf_model = save_hf_model("gemma4", tmp_path / "moe", **MOE)
    model = from_pretrained(tmp_path / "moe")
    assert model.layers[0].experts.gate_up[...].shape == (4, 64, 64)
    batch = padded_batch()
    expected = hf_logits(hf_model, batch["input_ids"], batch["attention_mask"])
    assert_close_on_tokens(jax_logits(model, batch), expected, batch["attention_mask"], 1e-4)
    first, second = batch["input_ids"][0, :9], batch["input_ids"][0, 9:]
    packed = {
        "input_ids": batch["input_ids"][:1],
        "positions": np.concatenate([np.arange(9), np.arange(7)])[None].astype(np.int32),
        "segment_ids": np.array([[1] * 9 + [2] * 7], np.int32),
    }
    alone = np.concatenate(
        [hf_logits(hf_model, first[None])[0], hf_logits(hf_model, second[None])[0]]
    )
    assert_close_on_tokens(jax_logits(model, packed)[0], alone, np.ones(16), 1e-4)
    out = save_pretrained(model, tmp_path / "export")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
    again = hf_logits(reloaded.float().eval(), batch["input_ids"], batch["attention_mask"])
    assert_close_on_tokens(again, expected, batch["attention_mask"], 1e-4)


def test_lora_merges_and_exports(hf_checkpoint, tmp_path):
    """LoRA on every projection Gemma 4 has (shared layers have no k/v_proj, k_eq_v layers no
    v_proj), folded and exported with the layer scalars: transformers' logits equal the
    adapted model's."""
    path, _ = hf_checkpoint("gemma4")
    model = from_pretrained(path)
    apply_lora(model, LoRASpec(rank=4, alpha=8.0), sharding.single_device_mesh())
    linears = list(decoder_linears(model))
    assert len(linears) == 4 * 7 - 2 * 2 - 1  # 4 layers x 7, less shared k/v, one v_proj
    for index, (_, _, linear) in enumerate(linears):
        noise = jax.random.normal(jax.random.key(index), linear.lora_b[...].shape)
        linear.lora_b.value = 0.05 * noise
    batch = padded_batch()
    out = save_pretrained(merged(model), tmp_path / "export")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
    expected = hf_logits(reloaded.float().eval(), batch["input_ids"], batch["attention_mask"])
    assert_close_on_tokens(jax_logits(model, batch), expected, batch["attention_mask"], 1e-4)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"enable_moe_block": True, "num_experts": 4, "top_k_experts": 5}, "top_k_experts"),
        ({"use_bidirectional_attention": "all"}, "use_bidirectional_attention"),
        ({"num_kv_shared_layers": 4}, "num_kv_shared_layers"),
    ],
)
def test_what_sft_jax_does_not_follow_is_refused_by_name(overrides, field):
    with pytest.raises(UnsupportedModelError, match=field):
        from_hf_config(hf_config("gemma4", **overrides))
