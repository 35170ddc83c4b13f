"""Mixture of experts: config parsing, unsupported variants, dropless dispatch against a dense
loop over experts (skewed routing included). Logit parity and export of the three families run
in tests/models/test_models.py (they are in hf_models.FAMILIES)."""

from __future__ import annotations

import functools
import logging
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import safetensors
import torch
import transformers
from flax import nnx
from hf_models import MOE_FAMILIES, VOCAB, hf_config, hf_logits, save_hf_model
from test_demo import DEMO_MODEL, logged, run_demo
from test_models import assert_close_on_tokens, jax_logits, padded_batch
from test_step import ROWS, SEQ_LEN, step_builder, synthetic_batch, train_config
from test_trainer import tensorboard_scalars

from sft_jax.adapters.lora import LoRASpec, adapters_off, apply_lora, save_adapter, trainable_filter
from sft_jax.adapters.lora import merged as fold_adapters
from sft_jax.core.errors import ConfigError
from sft_jax.core.spec import RunSpec
from sft_jax.models import (
    CausalLM,
    UnsupportedModelError,
    from_hf_config,
    from_pretrained,
    save_pretrained,
)
from sft_jax.models.decoder import decoder_linears
from sft_jax.models.layers import LoRAParam, activate
from sft_jax.models.moe import dropless_experts, quantize_experts, use_moe_dispatch
from sft_jax.models.partitioning import experts_per_shard
from sft_jax.models.quantize import QuantSpec
from sft_jax.objectives.moe import load_balancing_loss
from sft_jax.train import sharding
from sft_jax.train.compiled import init_state
from sft_jax.train.config_check import check_for_model, check_values
from sft_jax.train.flops import matmul_params
from sft_jax.train.optim import make_optimizer
from sft_jax.train.sharding import device_batch
from sft_jax.train.step import StepOptions

NUM_EXPERTS, WIDTH, EXPERT_WIDTH, TOP_K, TOKENS = 4, 8, 6, 2, 10


def test_moe_config_fields():
    qwen3 = from_hf_config(hf_config("qwen3_moe"))
    assert (qwen3.num_experts, qwen3.experts_per_token, qwen3.moe_intermediate_size) == (4, 2, 32)
    assert qwen3.moe_layers == (0, 2) and qwen3.norm_topk_prob and qwen3.qk_norm
    assert qwen3.shared_expert_intermediate_size == 0 and qwen3.router_aux_loss_coef == 0.01
    qwen2 = from_hf_config(hf_config("qwen2_moe"))
    assert qwen2.moe_layers == (1,) and not qwen2.norm_topk_prob and qwen2.qkv_bias
    assert qwen2.shared_expert_intermediate_size == 80
    mixtral = from_hf_config(hf_config("mixtral"))
    assert mixtral.moe_layers == (0, 1, 2) and mixtral.norm_topk_prob
    assert mixtral.moe_intermediate_size == 48 and mixtral.expert_names == "mixtral"
    assert mixtral.layer_types == ("sliding_attention",) * 3 and mixtral.sliding_window == 5


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_export_writes_the_hub_per_expert_layout(family, tmp_path, caplog):
    """transformers' save_pretrained writes one tensor per expert, and so does our export: the
    same tensor names, every one read on load (nothing reported unused)."""
    save_hf_model(family, tmp_path / "hf")
    with caplog.at_level(logging.WARNING):
        model = from_pretrained(tmp_path / "hf")
    assert "not used" not in caplog.text
    save_pretrained(model, tmp_path / "ours")

    def names(directory):
        with safetensors.safe_open(directory / "model.safetensors", "np") as f:
            return set(f.keys())

    ours = names(tmp_path / "ours")
    assert ours == names(tmp_path / "hf")
    expert = "block_sparse_moe.experts.3.w2" if family == "mixtral" else "mlp.experts.3.down_proj"
    assert f"model.layers.1.{expert}.weight" in ours
    assert not any("gate_up_proj" in name for name in ours)


@pytest.mark.parametrize(
    ("config", "field"),
    [
        (transformers.MixtralConfig(num_hidden_layers=1, router_jitter_noise=0.1), "router_jitter"),
        (transformers.Qwen3MoeConfig(num_experts=4, num_experts_per_tok=8), "num_experts_per_tok"),
        (transformers.DeepseekV2Config(num_hidden_layers=1), "deepseek_v2.*MLA"),
        (
            transformers.GptOssConfig(
                num_hidden_layers=1, quantization_config={"quant_method": "fp8"}
            ),
            r"gpt_oss: config\.json quantization_config \(quant_method 'fp8'\)",
        ),
    ],
)
def test_unsupported_moe_is_refused_before_weights(tmp_path, config, field):
    """Only config.json exists: the error must come from the config, before any weights."""
    config.save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match=field):
        from_pretrained(tmp_path)


def test_unknown_scoring_function_names_the_field():
    config = hf_config("qwen3_moe")
    config.scoring_func = "sigmoid"
    with pytest.raises(UnsupportedModelError, match=r"scoring_func='sigmoid'"):
        from_hf_config(config)


def dense_experts(x_NxD, experts_NxK, weights_NxK, gate, up, down, activation="silu"):
    """Every expert on every token, masked by the routing: the reference for dispatch."""
    out_NxD = jnp.zeros(x_NxD.shape, jnp.float32)
    for expert in range(gate.shape[0]):
        y_NxD = (activate(activation, x_NxD @ gate[expert]) * (x_NxD @ up[expert])) @ down[expert]
        token_weight = jnp.sum(jnp.where(experts_NxK == expert, weights_NxK, 0.0), axis=-1)
        out_NxD = out_NxD + y_NxD * token_weight[:, None]
    return out_NxD


def _expert_weights(seed: int):
    keys = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(keys[0], (TOKENS, WIDTH))
    gate = jax.random.normal(keys[1], (NUM_EXPERTS, WIDTH, EXPERT_WIDTH)) * 0.3
    up = jax.random.normal(keys[2], (NUM_EXPERTS, WIDTH, EXPERT_WIDTH)) * 0.3
    down = jax.random.normal(keys[3], (NUM_EXPERTS, EXPERT_WIDTH, WIDTH)) * 0.3
    return x, gate, up, down


ROUTINGS = {
    # random top-2 choices (distinct per token)
    "random": np.stack([np.random.default_rng(0).permutation(4)[:2] for _ in range(TOKENS)]),
    # every token's both slots on experts 1 and 2: experts 0 and 3 get nothing
    "skewed": np.tile([[2, 1]], (TOKENS, 1)),
    # all but one token to expert 3 first
    "one_expert": np.array([[3, 0]] * (TOKENS - 1) + [[1, 0]]),
}


@pytest.mark.parametrize("routing", sorted(ROUTINGS))
def test_dropless_dispatch_equals_dense_loop(routing):
    x, gate, up, down = _expert_weights(0)
    experts = jnp.asarray(ROUTINGS[routing], jnp.int32)
    weights = jax.nn.softmax(jax.random.normal(jax.random.key(5), (TOKENS, TOP_K)), -1)

    def loss(fn, x, weights, gate, up, down):
        out = fn(x, experts, weights, gate, up, down, "silu")
        return jnp.sum(out * jnp.cos(jnp.arange(out.size).reshape(out.shape)))

    args = (x, weights, gate, up, down)
    ours = jax.value_and_grad(lambda *a: loss(dropless_experts, *a), argnums=range(5))(*args)
    dense = jax.value_and_grad(lambda *a: loss(dense_experts, *a), argnums=range(5))(*args)
    np.testing.assert_allclose(ours[0], dense[0], rtol=1e-5)
    for name, g, ref in zip(("x", "weights", "gate", "up", "down"), ours[1], dense[1], strict=True):
        np.testing.assert_allclose(g, ref, rtol=1e-4, atol=1e-5, err_msg=name)
    if routing == "skewed":  # experts without tokens get exactly zero gradient
        assert not np.any(np.asarray(ours[1][2])[[0, 3]])


def _labelled_batch(seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """(our batch, transformers' labels) for the padded test batch: the same targets."""
    batch = padded_batch(seed)
    mask = batch["attention_mask"]
    batch["target_ids"] = np.concatenate([batch["input_ids"][:, 1:], np.zeros((2, 1))], 1)
    batch["target_ids"] = batch["target_ids"].astype(np.int32)
    batch["target_mask"] = np.concatenate([mask[:, 1:], np.zeros((2, 1), np.int32)], 1)
    labels = np.where(mask > 0, batch["input_ids"], -100)
    return batch, labels


def _hf_loss_and_grads(hf_model, batch, labels):
    hf_model.zero_grad()
    out = hf_model(
        input_ids=torch.as_tensor(batch["input_ids"], dtype=torch.long),
        attention_mask=torch.as_tensor(batch["attention_mask"]),
        labels=torch.as_tensor(labels, dtype=torch.long),
        output_router_logits=True,
    )
    out.loss.backward()
    return out, {name: p.grad.numpy() for name, p in hf_model.named_parameters()}


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_loss_with_aux_equals_transformers(family, tmp_path):
    """CE + router_aux_loss_coef * aux over real tokens equals transformers' `loss` with
    output_router_logits=True, and so do the gradients of the router and of an expert."""
    hf_model = save_hf_model(family, tmp_path)
    batch, labels = _labelled_batch()
    out, hf_grads = _hf_loss_and_grads(hf_model, batch, labels)
    model = from_pretrained(tmp_path)
    objective = StepOptions(
        moe_layers=model.config.moe_layers,
        router_aux_loss_coef=model.config.router_aux_loss_coef,
        loss_chunk_size=4,
    ).objective()
    graphdef, params = nnx.split(model)

    def loss(params):
        sums = objective.sums(nnx.merge(graphdef, params), batch)
        return objective.loss(sums, objective.normalizer(batch)), sums

    (value, sums), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    np.testing.assert_allclose(value, out.loss.item(), rtol=1e-4)
    np.testing.assert_allclose(sums.aux, out.aux_loss.item(), rtol=1e-4)
    metrics = objective.metrics(sums, objective.normalizer(batch))
    assert set(metrics) >= {"train/ce", "train/aux_loss"}
    assert f"train/expert_load_max_over_mean/layer_{model.config.moe_layers[0]:02d}" in metrics
    layer = model.config.moe_layers[0]
    router_grad = grads["layers"][layer]["mlp"]["router"][...]
    hf_router = hf_grads[f"model.layers.{layer}.mlp.gate.weight"]
    np.testing.assert_allclose(router_grad.T, hf_router, rtol=1e-3, atol=1e-6)
    down_grad = grads["layers"][layer]["mlp"]["experts_down"][...]
    hf_down = hf_grads[f"model.layers.{layer}.mlp.experts.down_proj"]  # fused [X, D, F]
    np.testing.assert_allclose(np.swapaxes(down_grad, 1, 2), hf_down, rtol=1e-3, atol=1e-6)


def _moe_options(model: CausalLM, accumulation: int = 1) -> dict:
    return {
        "loss_chunk_size": 4, "moe_layers": model.config.moe_layers,
        "router_aux_loss_coef": 0.1, "router_z_loss_weight": 0.01,
        "gradient_accumulation_steps": accumulation,
    }  # fmt: skip


def _moe_steps(mesh, batches, accumulation: int = 1, dispatch: str = "gather"):
    """Metrics of each step and the final state, training a tiny random Qwen3-MoE on `mesh`."""
    model = CausalLM(from_hf_config(hf_config("qwen3_moe")), rngs=nnx.Rngs(0))
    use_moe_dispatch(model, dispatch)
    build = step_builder(model, mesh, ROWS, SEQ_LEN, **_moe_options(model, accumulation))
    tx, _ = make_optimizer(train_config())
    state, _ = init_state(model, tx, mesh)
    steps = build(model)
    history = []
    for batch in batches:
        state, metrics = steps.train(state, device_batch(batch, steps.batch_shardings))
        history.append(jax.device_get(metrics))
    return history, state


@pytest.fixture(scope="module")
def moe_single_device():
    batches = [synthetic_batch(seed) for seed in range(2)]
    return batches, _moe_steps(sharding.single_device_mesh(), batches)


@pytest.mark.parametrize("dispatch", ["gather", "all_to_all"])
@pytest.mark.parametrize(("fsdp", "expert"), [(1, 4), (2, 4)], ids=["expert4", "fsdp2xexpert4"])
def test_expert_parallel_equals_single_device(moe_single_device, fsdp, expert, dispatch):
    """Packed, padded rows; loss, aux loss, gradient norm and the updated weights of two steps
    equal a single device's, with one expert per device, by either dispatch."""
    batches, (expected, expected_state) = moe_single_device
    mesh = sharding.make_mesh(fsdp=fsdp, expert=expert, devices=jax.devices()[: fsdp * expert])
    history, state = _moe_steps(mesh, batches, dispatch=dispatch)
    keys = ("train/loss", "train/ce", "train/aux_loss", "train/router_z_loss", "train/grad_norm")
    for key in (*keys, "train/expert_load_max_over_mean/layer_02"):
        np.testing.assert_allclose(
            [m[key] for m in history], [m[key] for m in expected], rtol=2e-5, err_msg=key
        )
    experts = state["params"]["layers"][0]["mlp"]["experts_gate"]
    assert experts.sharding.spec[0] == "expert" and experts.addressable_shards[0].data.shape[0] == 1
    for a, b in zip(
        jax.tree.leaves(state["params"]), jax.tree.leaves(expected_state["params"]), strict=True
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("dispatch", "collectives"),
    [("gather", ("all-gather", "reduce-scatter")), ("all_to_all", ("all-to-all",))],
)
def test_expert_parallel_dispatch_equals_one_device(dispatch, collectives):
    """Under an expert axis the dispatch runs per device on its own experts (tokens gathered
    and partial sums reduce-scattered back, or token copies sent to their experts' devices and
    back by all-to-all): output and gradients equal one device's, skewed routing included
    (two of the four devices' experts get no token)."""
    x, gate, up, down = _expert_weights(1)
    x = jnp.tile(x, (4, 1))  # 40 tokens, 10 per device
    weights = jax.nn.softmax(jax.random.normal(jax.random.key(5), (x.shape[0], TOP_K)), -1)
    local = functools.partial(dropless_experts, activation="silu")

    def loss(x, weights, gate, up, down, experts):
        out = experts_per_shard(local, x, experts, weights, (gate, up, down), dispatch=dispatch)
        return jnp.sum(out * jnp.cos(jnp.arange(out.size).reshape(out.shape)))

    grad = jax.jit(jax.value_and_grad(loss, argnums=range(5)))
    mesh = sharding.make_mesh(fsdp=1, expert=4, devices=jax.devices()[:4])
    for routing in ("random", "skewed"):
        experts = jnp.asarray(np.tile(ROUTINGS[routing], (4, 1)), jnp.int32)
        expected = grad(x, weights, gate, up, down, experts)
        with jax.set_mesh(mesh):
            actual = grad(x, weights, gate, up, down, experts)
        np.testing.assert_allclose(actual[0], expected[0], rtol=1e-5, err_msg=routing)
        names = ("x", "weights", "gate", "up", "down")
        for name, g, ref in zip(names, actual[1], expected[1], strict=True):
            np.testing.assert_allclose(g, ref, rtol=1e-4, atol=1e-5, err_msg=f"{routing}: {name}")
    with jax.set_mesh(mesh):
        compiled = grad.lower(x, weights, gate, up, down, experts).compile().as_text()
    assert all(name in compiled for name in collectives), dispatch


def test_mfu_counts_active_parameters():
    """FLOPs per token count the router, k of the X experts and the shared expert: every
    matmul parameter of the transformers model minus the X - k experts a token skips."""
    for family in MOE_FAMILIES:
        hf_model = transformers.AutoModelForCausalLM.from_config(hf_config(family))
        config = from_hf_config(hf_config(family))
        total = sum(
            p.numel()
            for name, p in hf_model.named_parameters()
            if p.ndim >= 2 and "embed_tokens" not in name
        )
        if config.tie_word_embeddings:
            total += config.vocab_size * config.hidden_size  # the tied head is a product
        skipped = config.num_experts - config.experts_per_token
        per_expert = 3 * config.hidden_size * config.moe_intermediate_size
        active = total - len(config.moe_layers) * skipped * per_expert
        assert matmul_params(config) == active, family


def test_lora_on_attention_of_moe_exports_exactly(tmp_path):
    """Adapters on the attention projections of Qwen2-MoE: the router, experts and shared
    expert stay frozen; the PEFT adapter (in peft) and the merged export (in transformers)
    give our logits."""
    save_hf_model("qwen2_moe", tmp_path / "base")
    mesh = sharding.single_device_mesh()
    model = from_pretrained(tmp_path / "base", mesh=mesh)
    spec = LoRASpec(rank=4, alpha=8.0, targets=("q_proj", "k_proj", "v_proj", "o_proj"))
    apply_lora(model, spec, mesh)
    trainable = [
        "/".join(map(str, path))
        for path, _ in nnx.to_flat_state(nnx.state(model, trainable_filter(spec)))
    ]
    assert trainable and all("attn" in path and "lora_" in path for path in trainable)
    keys = iter(jax.random.split(jax.random.key(1), 64))
    for _, _, linear in decoder_linears(model):
        if linear.lora_b is not None:
            linear.lora_b[...] = 0.3 * jax.random.normal(next(keys), linear.lora_b[...].shape)
    batch = padded_batch(seed=3)
    actual = jax_logits(model, batch)
    save_adapter(model, tmp_path / "adapter", spec, base_model=str(tmp_path / "base"))
    hf_base = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "base", attn_implementation="eager"
    )
    peft_model = peft.PeftModel.from_pretrained(hf_base, tmp_path / "adapter").eval()
    expected = hf_logits(peft_model, batch["input_ids"], batch["attention_mask"])
    assert_close_on_tokens(actual, expected, batch["attention_mask"], rel_tol=1e-4)
    merged_logits = _merged_export_logits(model, tmp_path / "merged", batch)
    assert_close_on_tokens(merged_logits, actual, batch["attention_mask"], rel_tol=1e-4)


def _merged_export_logits(model: CausalLM, out_dir, batch) -> np.ndarray:
    """transformers' logits of `model` exported with its adapters merged."""
    merged_dir = save_pretrained(fold_adapters(model), out_dir)
    merged = transformers.AutoModelForCausalLM.from_pretrained(
        merged_dir, attn_implementation="eager"
    )
    return hf_logits(merged.eval(), batch["input_ids"], batch["attention_mask"])


@pytest.mark.e2e
def test_tiny_moe_sft_run_on_the_demo_data(tmp_path):
    """A Qwen3-MoE shaped like the demo model (4 experts, top 2) through main.py: its eval loss
    falls like the dense demo's (to under half in 60 steps), no NaN, the expert load ends
    spread, the export reloads in transformers."""
    model_dir = tmp_path / "tiny_moe"
    config = transformers.Qwen3MoeConfig(
        vocab_size=422, hidden_size=128, intermediate_size=384, moe_intermediate_size=96,
        num_experts=4, num_experts_per_tok=2, norm_topk_prob=True, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True,
        eos_token_id=0, pad_token_id=0, max_position_embeddings=1024, router_aux_loss_coef=0.01,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(DEMO_MODEL / name, model_dir / name)
    workdir = tmp_path / "run"
    run_demo(
        workdir, f"--config.model.name_or_path={model_dir}",
        "--config.train.router_aux_loss_coef=0.1",
        # Nothing here reads the generated replies: eval loss only, one checkpoint at the end
        # (neither changes the training itself).
        "--config.eval.generate_examples=0", "--config.checkpoint.every_steps=60",
    )  # fmt: skip
    records = logged(workdir)
    evals = [r["eval/loss"] for r in records if "eval/loss" in r]
    assert evals[-1] < evals[0] / 2
    train = [r for r in records if "train/loss" in r]
    assert all(np.isfinite(r["train/loss"]) and np.isfinite(r["train/aux_loss"]) for r in train)
    assert train[-1]["train/ce"] < 0.6 * train[0]["train/ce"]
    # top-2 of 4 experts: max / mean load is 1 when even, 2 when one expert is in every
    # token's pair (collapsed). Both layers start near or at 2 (the residual stream of a random
    # model shares one direction); the load-balancing loss at 0.1 spreads them (at the
    # checkpoint's 0.01 layer 1 stays at 2.0 for these 60 steps).
    final = [train[-1][f"train/expert_load_max_over_mean/layer_{i:02d}"] for i in (0, 1)]
    assert max(final) < 1.9, final
    scalars = tensorboard_scalars(workdir / "tensorboard")  # the per-layer load reaches it too
    for i, load in enumerate(final):
        tag = f"train/expert_load_max_over_mean/layer_{i:02d}"
        assert scalars[(tag, train[-1]["step"])] == pytest.approx(load, rel=1e-6)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(workdir / "export")
    assert type(reloaded).__name__ == "Qwen3MoeForCausalLM"


def test_expert_axis_must_divide_the_experts():
    import configs.base

    config = configs.base.get_config()
    config.mesh.expert = 3
    check_for_model(RunSpec.of(config), from_hf_config(hf_config("mixtral")), 1)  # resolved: fine
    with pytest.raises(ConfigError, match=r"config\.mesh\.expert=3: .* of 3 devices .*\(4"):
        check_for_model(RunSpec.of(config), from_hf_config(hf_config("mixtral")), 3)
    with pytest.raises(ConfigError, match=r"dense model has none"):
        check_for_model(RunSpec.of(config), from_hf_config(hf_config("llama2")), 3)


def test_moe_fields_of_the_config_are_checked():
    """The dispatch names a known kind; expert adapters and a trained router need LoRA and a
    mixture of experts, each refused naming its field."""
    import configs.base

    config = configs.base.get_config()
    check_values(RunSpec.of(config), 8, 8)
    config.model.moe_dispatch = "ragged"
    with pytest.raises(ConfigError, match=r"moe_dispatch='ragged': expected one of auto, gather"):
        check_values(RunSpec.of(config), 8, 8)
    config.model.moe_dispatch = "all_to_all"
    config.lora.expert_adapters = True
    with pytest.raises(ConfigError, match=r"lora\.expert_adapters=True: needs LoRA"):
        check_values(RunSpec.of(config), 8, 8)
    config.lora.rank = 8
    check_values(RunSpec.of(config), 8, 8)
    check_for_model(RunSpec.of(config), from_hf_config(hf_config("mixtral")), 1)
    with pytest.raises(ConfigError, match=r"lora\.expert_adapters=True: applies to mixtures"):
        check_for_model(RunSpec.of(config), from_hf_config(hf_config("llama2")), 1)


def test_aux_loss_of_packed_rows_equals_transformers_on_the_documents(tmp_path):
    """Two documents packed in one row with padding after them: the load-balancing loss is
    transformers' aux_loss over the same documents as separate, padded rows (padding and
    document boundaries respected)."""
    hf_model = save_hf_model("qwen3_moe", tmp_path)
    rng = np.random.default_rng(4)
    first, second = rng.integers(3, VOCAB, size=9), rng.integers(3, VOCAB, size=5)
    packed = {
        "input_ids": np.concatenate([first, second, np.zeros(2)])[None].astype(np.int32),
        "positions": np.concatenate([np.arange(9), np.arange(5), np.zeros(2)])[None],
        "segment_ids": np.array([[1] * 9 + [2] * 5 + [0] * 2], np.int32),
    }
    packed["positions"] = packed["positions"].astype(np.int32)
    model = from_pretrained(tmp_path)
    _, stats = nnx.jit(lambda m, b: m.forward(b["input_ids"], b["positions"], b["segment_ids"]))(
        model, packed
    )
    ids = np.zeros((2, 9), np.int64)
    ids[0], ids[1, :5] = first, second
    mask = np.zeros((2, 9), np.int64)
    mask[0], mask[1, :5] = 1, 1
    with torch.no_grad():
        out = hf_model(
            input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
            output_router_logits=True,
        )  # fmt: skip
    np.testing.assert_allclose(load_balancing_loss(stats), out.aux_loss.item(), rtol=1e-5)
    assert float(jnp.sum(stats.tokens)) == 14 * len(model.config.moe_layers)


def test_accumulated_aux_is_the_mean_over_micro_batches(moe_single_device):
    """With 2 micro-batches the cross-entropy is that of the whole batch, and the aux loss the
    mean of each micro-batch's (what transformers computes per forward pass)."""
    batches, (expected, _) = moe_single_device
    history, _ = _moe_steps(sharding.single_device_mesh(), batches[:1], accumulation=2)
    np.testing.assert_allclose(history[0]["train/ce"], expected[0]["train/ce"], rtol=2e-5)
    model = CausalLM(from_hf_config(hf_config("qwen3_moe")), rngs=nnx.Rngs(0))
    objective = StepOptions(**_moe_options(model)).objective()
    micro_aux = [
        objective.sums(model, {k: v[j::2] for k, v in batches[0].items()}).aux for j in (0, 1)
    ]
    assert abs(float(micro_aux[0]) - float(micro_aux[1])) > 1e-4  # the mean is not trivial
    np.testing.assert_allclose(history[0]["train/aux_loss"], np.mean(micro_aux), rtol=2e-5)


def _adapted_qwen3_moe(
    tmp_path, train_router: bool, quantization: QuantSpec | None = None
) -> tuple[CausalLM, LoRASpec]:
    """A tiny Qwen3-MoE from the hub layout with adapters on attention and every expert, their
    B made non-zero so that they change the logits (with `quantization`: QLoRA, experts too)."""
    save_hf_model("qwen3_moe", tmp_path / "base")
    mesh = sharding.single_device_mesh()
    model = from_pretrained(tmp_path / "base", mesh=mesh, quantization=quantization)
    if quantization is not None:
        quantize_experts(model, quantization, mesh)
    spec = LoRASpec(rank=4, alpha=8.0, targets=("q_proj", "v_proj"), experts=True,
                    train_router=train_router, quantization=quantization)  # fmt: skip
    apply_lora(model, spec, mesh)
    keys = iter(jax.random.split(jax.random.key(2), 64))
    for path, variable in nnx.to_flat_state(nnx.state(model, LoRAParam)):
        if str(path[-1]).endswith("_b"):  # lora_b, and experts_gate_b etc.
            variable.set_value(0.3 * jax.random.normal(next(keys), variable.get_value().shape))
    return model, spec


@pytest.mark.parametrize("train_router", [False, True], ids=["frozen_router", "trained_router"])
def test_expert_adapters_get_gradients_only_where_asked(tmp_path, train_router):
    """Adapters on every expert: the trainable state is the attention and expert adapters (and
    the routers only when asked), and each of them gets a non-zero gradient."""
    model, spec = _adapted_qwen3_moe(tmp_path, train_router)
    graphdef, trainable, frozen = nnx.split(model, trainable_filter(spec), ...)
    batch = padded_batch(seed=1)

    def loss(trainable):
        logits = nnx.merge(graphdef, trainable, frozen)(
            batch["input_ids"], batch["positions"], batch["segment_ids"]
        )
        return jnp.mean(jnp.square(logits))

    grads = dict(nnx.to_flat_state(jax.jit(jax.grad(loss))(trainable)))
    names = {"/".join(map(str, path)) for path in grads}
    expert_adapters = {name for name in names if "expert_lora" in name}
    assert len(expert_adapters) == 6 * len(model.config.moe_layers)  # A, B of gate, up, down
    routers = {name for name in names if name.endswith("router")}
    assert len(routers) == (len(model.config.moe_layers) if train_router else 0)
    others = names - expert_adapters - routers
    assert others and all("attn" in name and "lora_" in name for name in others), others
    for path, grad in grads.items():
        assert np.any(np.asarray(grad.get_value())), path


@pytest.mark.parametrize("quantized", [False, True], ids=["lora", "qlora_nf4"])
def test_merged_export_with_expert_adapters_reloads_in_transformers(tmp_path, quantized):
    """The merged export folds every expert's adapter (and, with QLoRA, the dequantized NF4
    expert weights) into plain weights: transformers' logits of the export equal ours; a PEFT
    adapter of expert adapters is refused with a clear error."""
    quantization = QuantSpec("nf4", block=16) if quantized else None
    model, spec = _adapted_qwen3_moe(tmp_path, train_router=True, quantization=quantization)
    if quantized:  # stored as 4-bit codes, which moved the weights (within NF4's error)
        block = model.layers[0].mlp
        assert block.experts_gate is None
        assert block.expert_quant["experts_gate"]["codes"][...].dtype == jnp.uint8
        with safetensors.safe_open(tmp_path / "base" / "model.safetensors", "np") as f:
            original = f.get_tensor("model.layers.0.mlp.experts.0.gate_proj.weight").T
        with adapters_off(model):
            error = np.abs(np.asarray(block.expert_weight("experts_gate"))[0] - original)
        assert 0 < error.max() < 0.2 * np.abs(original).max()
    batch = padded_batch(seed=3)
    actual = jax_logits(model, batch)
    expected = _merged_export_logits(model, tmp_path / "merged", batch)
    assert_close_on_tokens(actual, expected, batch["attention_mask"], rel_tol=1e-4)
    with adapters_off(model):
        base = jax_logits(model, batch)
    assert np.abs(base - actual).max() > 1e-2  # the expert adapters did change the logits
    with pytest.raises(ConfigError, match=r"expert_adapters=True: adapters on the experts"):
        save_adapter(model, tmp_path / "adapter", spec)
