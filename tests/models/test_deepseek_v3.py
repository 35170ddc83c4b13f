"""DeepSeek-V3: latent attention (with and without a query latent) and group-limited sigmoid
routing equal transformers' on padded and packed rows of odd lengths, in the loss and its
gradients, in greedy generation with the KV cache, sharded over fsdp x tensor x expert, with
LoRA on the latent projections (PEFT and the merged export), and what sft_jax cannot follow is
refused by name. The FAMILIES config's parity, packing, bf16 and export round trip also run in
test_models.py."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import safetensors
import torch
import transformers
from flax import nnx
from hf_models import VOCAB, hf_config, hf_logits, save_hf_model
from test_models import assert_close_on_tokens, jax_logits
from test_step import synthetic_batch

from sft_jax.adapters.lora import LoRASpec, apply_lora, save_adapter, trainable_filter
from sft_jax.adapters.lora import merged as fold_adapters
from sft_jax.core.errors import ConfigError
from sft_jax.generation.sampler import generate
from sft_jax.models import UnsupportedModelError, from_hf_config, from_pretrained, save_pretrained
from sft_jax.models.decoder import decoder_linears, use_attention
from sft_jax.models.deepseek import MLASpec
from sft_jax.models.layers import TRAINABLE
from sft_jax.train import sharding
from sft_jax.train.flops import matmul_params
from sft_jax.train.kernel_choice import choose_attention
from sft_jax.train.sharding import device_batch
from sft_jax.train.step import StepOptions

# The second config: one q_proj (no query latent), RoPE over halves without scaling, biases on
# the latent and output projections, 2 groups of which 1 is searched, unnormalized weights.
PLAIN_QUERY = {
    "q_lora_rank": None,
    "rope_interleave": False,
    "attention_bias": True,
    "rope_parameters": {"rope_type": "default", "rope_theta": 50000.0},
    "n_group": 2,
    "topk_group": 1,
    "num_experts_per_tok": 2,
    "norm_topk_prob": False,
    "n_shared_experts": 1,
    "routed_scaling_factor": 1.5,
}
CONFIGS = {"latent_query": {}, "plain_query": PLAIN_QUERY}
EOS = 2


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> (directory, transformers model) of each tiny config, saved once."""
    saved = {}
    for name, overrides in CONFIGS.items():
        path = tmp_path_factory.mktemp(name)
        saved[name] = (path, save_hf_model("deepseek_v3", path, **overrides))
    return saved


def _mscale(factor: float, mscale: float) -> float:
    return 0.1 * mscale * np.log(factor) + 1.0


def test_config_reads_latent_attention_and_routing():
    config = from_hf_config(hf_config("deepseek_v3"))
    assert config.mla == MLASpec(24, 16, 12, 8, 10, rope_interleave=True)
    assert (config.head_dim, config.value_head_dim, config.num_kv_heads) == (20, 10, 4)
    # YaRN: q.k scaled by mscale(factor, mscale_all_dim)^2, cos/sin by the mscale ratio.
    assert config.attention_scale == pytest.approx(20**-0.5 * _mscale(4.0, 0.7) ** 2)
    rope = config.rope_for("full_attention")
    assert rope.attention_factor == pytest.approx(_mscale(4.0, 0.9) / _mscale(4.0, 0.7))
    assert config.moe_layers == (1, 2) and config.shared_expert_intermediate_size == 32
    assert (config.router_scoring, config.router_groups, config.router_top_groups) == (
        "sigmoid",
        4,
        2,
    )
    assert config.routed_scaling_factor == 2.5 and not config.shared_expert_gated
    plain = from_hf_config(hf_config("deepseek_v3", **PLAIN_QUERY))
    assert plain.mla.q_lora_rank == 0 and plain.attention_scale == pytest.approx(20**-0.5)
    assert plain.o_bias and not plain.mla.rope_interleave


def _padded(lengths: tuple[int, ...], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    seq_len = max(lengths)
    real = (np.arange(seq_len)[None, :] < np.array(lengths)[:, None]).astype(np.int32)
    input_ids = rng.integers(3, VOCAB, size=real.shape).astype(np.int32) * real
    positions = np.tile(np.arange(seq_len, dtype=np.int32), (len(lengths), 1)) * real
    return {
        "input_ids": input_ids,
        "attention_mask": real,
        "positions": positions,
        "segment_ids": real,
    }


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_padded_and_packed_rows_equal_transformers(checkpoints, name):
    """Rows of 13 and 8 tokens (right-padded), and one row packing documents of 6, 9 and 4
    tokens: each document's logits equal transformers' on the document alone."""
    path, hf_model = checkpoints[name]
    model = from_pretrained(path)
    batch = _padded((13, 8), seed=4)
    expected = hf_logits(hf_model, batch["input_ids"], batch["attention_mask"])
    assert_close_on_tokens(
        jax_logits(model, batch), expected, batch["attention_mask"], rel_tol=1e-4
    )
    rng = np.random.default_rng(5)
    documents = [rng.integers(3, VOCAB, size=n) for n in (6, 9, 4)]
    packed = {
        "input_ids": np.concatenate(documents)[None].astype(np.int32),
        "positions": np.concatenate([np.arange(len(d)) for d in documents])[None].astype(np.int32),
        "segment_ids": np.concatenate([np.full(len(d), i + 1) for i, d in enumerate(documents)])[
            None
        ].astype(np.int32),
    }
    expected = np.concatenate([hf_logits(hf_model, d[None])[0] for d in documents])
    actual = jax_logits(model, packed)[0]
    assert_close_on_tokens(actual, expected, np.ones(len(expected)), rel_tol=1e-4)


def test_bias_groups_and_scale_show_in_the_logits(checkpoints):
    """Zeroing the correction bias, routing without groups, or dropping YaRN's mscale from the
    softmax scale each moves the logits well past the parity tolerance."""
    path, _ = checkpoints["latent_query"]
    batch = _padded((13, 8), seed=4)
    reference = jax_logits(from_pretrained(path), batch)
    changes = {
        "bias": lambda layer: layer.mlp.router_bias.set_value(jnp.zeros(8)),
        "groups": lambda layer: setattr(layer.mlp, "router_groups", (1, 1, 2.5)),
        "scale": lambda layer: setattr(layer.attn, "scale", 20**-0.5),
    }
    real = batch["attention_mask"].astype(bool)
    for name, change in changes.items():
        model = from_pretrained(path)
        for layer in model.layers[1:]:
            change(layer)
        moved = np.abs(jax_logits(model, batch)[real] - reference[real]).max()
        assert moved > 1e-2 * np.abs(reference[real]).max(), name


def test_export_writes_the_checkpoint_tensor_names(checkpoints, tmp_path, caplog):
    """Every tensor read on load (none reported unused), the score-correction bias among them,
    and the export writes exactly transformers' names."""
    path, _ = checkpoints["latent_query"]
    with caplog.at_level(logging.WARNING):
        model = from_pretrained(path)
    assert "not used" not in caplog.text
    out = save_pretrained(model, tmp_path / "export")

    def names(directory) -> set[str]:
        with safetensors.safe_open(directory / "model.safetensors", "np") as f:
            return set(f.keys())

    assert names(out) == names(path)
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in names(out)


def test_greedy_generation_equals_transformers(checkpoints):
    """The KV cache (per-head keys [.., E] and values [.., W]) against transformers' generate,
    whose cache holds the latents: token for token, prompts of different lengths in one batch
    (the query latent, YaRN and interleaved RoPE config)."""
    path, hf_model = checkpoints["latent_query"]
    prompts = [[1, 17, 33, 5, 80, 9, 64, 101, 12], [1, 40, 7], [1, 90, 91, 3, 55, 28]]
    actual = generate(from_pretrained(path), prompts, max_new_tokens=12, stop_token_ids=[EOS])
    expected = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = hf_model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=12,
                do_sample=False,
                eos_token_id=[EOS],
                pad_token_id=0,
            )
        expected.append(out[0, len(prompt) :].tolist())
    assert actual == expected


def test_loss_and_gradients_equal_transformers(checkpoints):
    """Cross-entropy over the padded batch and the gradients of the router, an expert, the
    latent projections; the correction bias gets none (it is not trained)."""
    path, hf_model = checkpoints["latent_query"]
    batch = _padded((13, 8), seed=6)
    mask = batch["attention_mask"]
    batch["target_ids"] = np.concatenate([batch["input_ids"][:, 1:], np.zeros((2, 1))], 1)
    batch["target_ids"] = batch["target_ids"].astype(np.int32)
    batch["target_mask"] = np.concatenate([mask[:, 1:], np.zeros((2, 1), np.int32)], 1)
    hf_model.zero_grad()
    out = hf_model(
        input_ids=torch.as_tensor(batch["input_ids"], dtype=torch.long),
        attention_mask=torch.as_tensor(mask),
        labels=torch.as_tensor(np.where(mask > 0, batch["input_ids"], -100), dtype=torch.long),
    )
    out.loss.backward()
    hf_grads = {name: p.grad.numpy() for name, p in hf_model.named_parameters()}
    model = from_pretrained(path)
    objective = StepOptions(moe_layers=model.config.moe_layers, loss_chunk_size=4).objective()
    graphdef, params, rest = nnx.split(model, TRAINABLE, ...)
    assert [path[-1] for path, _ in nnx.to_flat_state(rest)] == ["router_bias"] * 2

    def loss(params):
        sums = objective.sums(nnx.merge(graphdef, params, rest), batch)
        return objective.loss(sums, objective.normalizer(batch))

    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    np.testing.assert_allclose(value, out.loss.item(), rtol=1e-5)
    layer, attn = grads["layers"][1], "model.layers.1.self_attn"
    pairs = {
        "model.layers.1.mlp.gate.weight": layer["mlp"]["router"][...].T,
        "model.layers.1.mlp.experts.down_proj": np.swapaxes(
            layer["mlp"]["experts_down"][...], 1, 2
        ),
        f"{attn}.kv_b_proj.weight": layer["attn"]["kv_b_proj"]["kernel"][...].T,
        f"{attn}.q_a_proj.weight": layer["attn"]["q_a_proj"]["kernel"][...].T,
        f"{attn}.kv_a_layernorm.weight": layer["attn"]["kv_a_layernorm"]["scale"][...],
    }
    for name, ours in pairs.items():
        np.testing.assert_allclose(ours, hf_grads[name], rtol=1e-3, atol=1e-6, err_msg=name)


def test_fsdp_tensor_expert_sharding_equals_one_device(checkpoints):
    """Loss and every gradient on fsdp 2 x tensor 2 x expert 2 (8 devices) equal one device's,
    on packed, padded rows; the correction bias is no trained parameter."""
    path, _ = checkpoints["latent_query"]
    batch = synthetic_batch(seed=0)

    def loss_and_grads(mesh):
        model = from_pretrained(path, mesh=mesh)
        objective = StepOptions(moe_layers=model.config.moe_layers, loss_chunk_size=4).objective()
        graphdef, params, rest = nnx.split(model, TRAINABLE, ...)
        rows = device_batch(batch, sharding.batch_shardings(mesh))

        def loss(params):
            sums = objective.sums(nnx.merge(graphdef, params, rest), rows)
            return objective.loss(sums, objective.normalizer(rows))

        with jax.set_mesh(mesh):
            return *jax.jit(jax.value_and_grad(loss))(params), params

    expected_loss, expected, _ = loss_and_grads(sharding.single_device_mesh())
    mesh = sharding.make_mesh(fsdp=2, tensor=2, expert=2)
    actual_loss, actual, params = loss_and_grads(mesh)
    np.testing.assert_allclose(actual_loss, expected_loss, rtol=1e-5)
    experts = params["layers"][1]["mlp"]["experts_gate"][...]
    assert experts.sharding.spec == jax.sharding.PartitionSpec("expert", "fsdp", "tensor")
    kv_b = params["layers"][0]["attn"]["kv_b_proj"]["kernel"][...]
    assert kv_b.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert "router_bias" not in actual["layers"][1]["mlp"]
    flat_actual, flat_expected = nnx.to_flat_state(actual), nnx.to_flat_state(expected)
    for (name, a), (_, b) in zip(flat_actual, flat_expected, strict=True):
        np.testing.assert_allclose(
            np.asarray(a[...]), np.asarray(b[...]), rtol=1e-4, atol=1e-6, err_msg=str(name)
        )


def test_lora_on_the_latent_projections_equals_peft_and_the_merged_export(checkpoints, tmp_path):
    """LoRA on q_a_proj, q_b_proj, kv_a_proj_with_mqa, kv_b_proj and o_proj, as PEFT names
    them: PEFT's adapter on the base and transformers on the merged export give our logits;
    only adapters train. (gate/up/down are left out: on a transformers-v5 MoE checkpoint PEFT
    maps those names to the fused experts' parameters, not to the dense layers' MLP.)"""
    path, _ = checkpoints["latent_query"]
    mesh = sharding.single_device_mesh()
    model = from_pretrained(path, mesh=mesh)
    targets = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
    spec = LoRASpec(rank=4, alpha=8.0, targets=targets)
    apply_lora(model, spec, mesh)
    adapted = {name for _, name, linear in decoder_linears(model) if linear.lora_a is not None}
    assert adapted == set(targets)
    trained = nnx.to_flat_state(nnx.state(model, trainable_filter(spec)))
    assert trained and all("lora_" in str(path[-1]) for path, _ in trained)
    keys = iter(jax.random.split(jax.random.key(1), 64))
    for _, _, linear in decoder_linears(model):
        if linear.lora_b is not None:
            linear.lora_b[...] = 0.3 * jax.random.normal(next(keys), linear.lora_b[...].shape)
    batch = _padded((13, 8), seed=7)
    actual = jax_logits(model, batch)
    save_adapter(model, tmp_path / "adapter", spec, base_model=str(path))
    hf_base = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
    peft_model = peft.PeftModel.from_pretrained(hf_base, tmp_path / "adapter").eval()
    expected = hf_logits(peft_model, batch["input_ids"], batch["attention_mask"])
    assert_close_on_tokens(actual, expected, batch["attention_mask"], rel_tol=1e-4)
    merged_dir = save_pretrained(fold_adapters(model), tmp_path / "merged")
    merged = transformers.AutoModelForCausalLM.from_pretrained(
        merged_dir, attn_implementation="eager"
    )
    merged_logits = hf_logits(merged.eval(), batch["input_ids"], batch["attention_mask"])
    assert_close_on_tokens(merged_logits, actual, batch["attention_mask"], rel_tol=1e-4)


def test_mfu_counts_the_active_parameters():
    """Every matmul weight of the transformers model, minus the experts a token skips."""
    for overrides in CONFIGS.values():
        hf = hf_config("deepseek_v3", **overrides)
        hf_model = transformers.AutoModelForCausalLM.from_config(hf)
        config = from_hf_config(hf)
        total = sum(
            p.numel()
            for name, p in hf_model.named_parameters()
            if p.ndim >= 2 and "embed_tokens" not in name
        )
        skipped = config.num_experts - config.experts_per_token
        per_expert = 3 * config.hidden_size * config.moe_intermediate_size
        assert matmul_params(config) == total - len(config.moe_layers) * skipped * per_expert


def test_what_sft_jax_cannot_follow_is_refused_by_name(checkpoints):
    with pytest.raises(UnsupportedModelError, match="num_key_value_heads=2 differs"):
        from_hf_config(hf_config("deepseek_v3", num_key_value_heads=2))
    with pytest.raises(UnsupportedModelError, match="n_group=3 must divide"):
        from_hf_config(hf_config("deepseek_v3", n_group=3))
    with pytest.raises(UnsupportedModelError, match="topk_group=5"):
        from_hf_config(hf_config("deepseek_v3", topk_group=5))
    config = from_hf_config(hf_config("deepseek_v3"))
    choice = {"accelerator": "nvidia", "model": config, "compute_dtype": "bfloat16"}
    assert choose_attention("auto", max_length=128, **choice)[0] == "xla"
    with pytest.raises(ConfigError, match="latent attention runs the einsum path only"):
        choose_attention("blockwise", max_length=128, **choice)
    model = from_pretrained(checkpoints["plain_query"][0])
    use_attention(model, "blockwise")
    with pytest.raises(UnsupportedModelError, match="'blockwise' is not implemented for latent"):
        jax_logits(model, _padded((5,), seed=0))
