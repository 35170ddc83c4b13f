"""LoRA on the vision part of image-text models (config.lora.vision_targets): after a few steps
with adapters on the vision tower, projector and language model, PEFT's adapter loaded on
transformers' model and our merged export both give our logits on image inputs (Gemma 3 and
Qwen2.5-VL, float32); the vision base weights stay frozen; bad names are refused by name."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import transformers
from flax import nnx
from safetensors import safe_open
from test_gemma3_vision import assert_close, our_logits, setup, transformers_logits  # noqa: F401
from test_qwen2_5_vl import (  # noqa: F401
    IMAGE_FIELDS,
    MROPE,
    _hf_logits,
    _max_rel,
    _our_logits,
    _rows,
    checkpoint,
    documents,
)
from test_trainer import base_config

from sft_jax.adapters import vision_lora
from sft_jax.adapters.lora import (
    LoRASpec,
    apply_lora,
    merged,
    parameter_counts,
    save_adapter,
    trainable_filter,
)
from sft_jax.core.errors import ConfigError
from sft_jax.core.spec import RunSpec
from sft_jax.models import from_hf_config, from_pretrained, save_pretrained
from sft_jax.models.decoder import decoder_linears
from sft_jax.models.gemma3_images import row_images
from sft_jax.models.layers import LoRAParam
from sft_jax.models.partitioning import single_device_mesh
from sft_jax.train import adapter_checks, config_check, sharding


def _randomize_adapters(model, seed: int = 1) -> None:
    """Nonzero B everywhere (B starts at 0), so that every adapter shows in the logits."""
    linears = [linear for _, _, linear in decoder_linears(model)]
    linears += [entry.linear for entry in vision_lora.vision_linears(model)]
    keys = iter(jax.random.split(jax.random.key(seed), len(linears)))
    for linear in linears:
        if linear.lora_b is not None:
            b = linear.lora_b[...]
            value = 0.2 * jax.random.normal(next(keys), b.shape)
            linear.lora_b[...] = jax.device_put(value, b.sharding)


def _train(model, spec: LoRASpec, logits_of, ids: np.ndarray, steps: int = 3) -> None:
    """A few SGD steps on next-token cross-entropy, updating what LoRA training updates
    (trainable_filter: the adapters); asserts the rest stayed as it was."""
    trainable = trainable_filter(spec)
    frozen_before = jax.tree.map(np.asarray, nnx.state(model, nnx.Not(trainable)))
    vision_before = {e.module: np.asarray(e.linear.lora_b[...]) for e in vision_lora.adapted(model)}
    targets = jnp.asarray(ids[:, 1:])

    def loss(m):
        logp = jax.nn.log_softmax(logits_of(m)[:, :-1], axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))

    @nnx.jit
    def step(m):
        grads = nnx.grad(loss, argnums=nnx.DiffState(0, trainable))(m)
        params = nnx.state(m, trainable)
        nnx.update(m, jax.tree.map(lambda p, g: p - 0.5 * g, params, grads))

    for _ in range(steps):
        step(model)
    frozen_after = jax.tree.map(np.asarray, nnx.state(model, nnx.Not(trainable)))
    jax.tree.map(np.testing.assert_array_equal, frozen_after, frozen_before)
    for entry in vision_lora.adapted(model):  # the vision adapters trained
        assert not np.array_equal(np.asarray(entry.linear.lora_b[...]), vision_before[entry.module])


def _saved_keys(adapter_dir) -> list[str]:
    with safe_open(adapter_dir / "adapter_model.safetensors", "np") as f:
        return list(f.keys())


def test_gemma3_vision_adapters_equal_peft_and_merged_export(setup, tmp_path):  # noqa: F811
    """Adapters on every SigLIP linear, the projector (PEFT's target_parameters) and the
    language model's q/v_proj, after 3 steps: PEFT's logits and the merged export's equal ours."""
    path, _, docs = setup
    model = from_pretrained(path)
    spec = LoRASpec(rank=2, alpha=4.0, dropout=0.0, targets=("q_proj", "v_proj"))
    spec = dataclasses.replace(spec, vision_targets=("all-linear",)).for_model(model)
    assert spec.vision_targets == vision_lora.GEMMA3_TARGETS
    apply_lora(model, spec, single_device_mesh())
    _randomize_adapters(model)
    document = docs[1]
    length = len(document["input_ids"])
    pixels = row_images([document], 2, model.config.vision)["pixel_values"][None]
    args = (document["input_ids"][None], np.arange(length)[None], np.ones((1, length)), pixels)

    def logits_of(m):
        images = {"pixel_values": jnp.asarray(pixels)}
        ids, positions, segments = (jnp.asarray(a, jnp.int32) for a in args[:3])
        return m.logits(m.hidden_states(ids, positions, segments, images=images))

    _train(model, spec, logits_of, args[0])
    ours = our_logits(model, *args)[0]
    save_adapter(model, tmp_path / "adapter", spec, base_model=str(path))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["target_parameters"] == ["model.multi_modal_projector.mm_input_projection_weight"]
    base = transformers.Gemma3ForConditionalGeneration.from_pretrained(path)
    adapted = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    wrapped = [n for n, _ in adapted.named_modules() if n.endswith(".lora_A")]
    # 2 x (q, v) in the language model, 2 x 6 in the tower, 1 on the projector.
    assert sum("vision_tower" in n for n in wrapped) == 12 and len(wrapped) == 17
    assert_close(ours, transformers_logits(adapted, document))
    # As print_trainable_parameters counts (the adapter loaded for inference: none trains).
    peft_adapters = sum(p.numel() for n, p in adapted.named_parameters() if ".lora_" in n)
    _, peft_total = adapted.get_nb_trainable_parameters()
    assert parameter_counts(model, trainable_filter(spec)) == (peft_adapters, peft_total)
    with pytest.raises(ValueError, match="fold the adapters"):  # vision adapters unmerged
        save_pretrained(model, tmp_path / "unmerged")
    save_pretrained(merged(model), tmp_path / "merged")
    reloaded = transformers.Gemma3ForConditionalGeneration.from_pretrained(tmp_path / "merged")
    assert_close(ours, transformers_logits(reloaded.eval(), document))
    # The vision adapters matter: without them the logits move.
    for entry in vision_lora.adapted(model):
        entry.linear.lora_scale = 0.0
    assert _max_rel(our_logits(model, *args)[0], ours) > 1e-3


def test_qwen_vl_vision_adapters_equal_peft_and_merged_export(checkpoint, documents, tmp_path):  # noqa: F811
    """Adapters on the ViT's qkv/proj and MLPs and the merger's mlp.0/mlp.2, and the language
    model's q/k/v/o_proj, after 3 steps: PEFT's logits and the merged export's equal ours."""
    path, _ = checkpoint
    mesh = single_device_mesh()
    model = from_pretrained(path, mesh=mesh)
    spec = LoRASpec(
        rank=4,
        alpha=8.0,
        dropout=0.0,
        targets=("q_proj", "k_proj", "v_proj", "o_proj"),
        vision_targets=("qkv", "proj", "gate_proj", "up_proj", "down_proj", "mlp.0", "mlp.2"),
    ).for_model(model)
    apply_lora(model, spec, mesh)
    _randomize_adapters(model)
    docs = documents[:2]
    batch = _rows(model.config.vision, [[d] for d in docs])

    def logits_of(m):
        images = {name: jnp.asarray(batch[name]) for name in (*IMAGE_FIELDS, *MROPE)}
        ids, positions, segments = (batch[k] for k in ("input_ids", "positions", "segment_ids"))
        return m.logits(m.hidden_states(ids, positions, segments, images=images))

    _train(model, spec, logits_of, batch["input_ids"])
    actual = _our_logits(model, batch)
    save_adapter(model, tmp_path / "adapter", spec, base_model=str(path))
    keys = _saved_keys(tmp_path / "adapter")
    assert "base_model.model.model.visual.merger.mlp.0.lora_A.weight" in keys
    base = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(path)
    peft_model = peft.PeftModel.from_pretrained(base.eval().float(), tmp_path / "adapter").eval()
    wrapped = [n for n, _ in peft_model.named_modules() if n.endswith(".lora_A")]
    depth = model.config.vision.depth
    assert sum(".visual." in n for n in wrapped) == 5 * depth + 2
    save_pretrained(merged(model), tmp_path / "merged")
    reloaded = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "merged")
    for expected in (_hf_logits(peft_model, docs), _hf_logits(reloaded.eval().float(), docs)):
        for row, d in enumerate(docs):
            n = len(d["input_ids"])
            assert _max_rel(actual[row, :n], expected[row, :n]) < 1e-4


def test_switch_off_and_bad_names(checkpoint, tmp_path):  # noqa: F811
    """vision_targets '' leaves the vision part as it is (no adapter, nothing in the file);
    an unknown name, a text model, dropout or DoRA are refused naming the field."""
    path, _ = checkpoint
    model = from_pretrained(path)
    spec = LoRASpec(rank=2, targets=("q_proj",)).for_model(model)
    apply_lora(model, spec, single_device_mesh())
    assert not vision_lora.adapted(model)
    assert not any(p[0] == "vision" for p, _ in nnx.to_flat_state(nnx.state(model, LoRAParam)))
    save_adapter(model, tmp_path / "adapter", spec)
    assert not any("visual" in k for k in _saved_keys(tmp_path / "adapter"))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert "target_parameters" not in config
    with pytest.raises(ConfigError, match=r"lora\.vision_targets.*'fc1'.*qkv, proj, gate_proj"):
        LoRASpec(rank=2, vision_targets=("fc1",)).for_model(model)
    text = dict(model.config.__dict__, vision=None)
    with pytest.raises(ConfigError, match=r"lora\.vision_targets.*no vision part"):
        vision_lora.resolve(("qkv",), type("Config", (), text))
    config = base_config(tmp_path)  # checked against the checkpoint before its weights load
    config.lora.rank, config.lora.dropout, config.lora.vision_targets = 4, 0.0, "qkv,fc9"
    with pytest.raises(ConfigError, match=r"lora\.vision_targets: unknown \['fc9'\]"):
        config_check.check_for_model(RunSpec.of(config), model.config, 1)
    for field, value in (("dropout", 0.05), ("use_dora", True)):
        config = base_config(tmp_path)
        config.lora.rank, config.lora.dropout, config.lora.vision_targets = 4, 0.0, "qkv"
        setattr(config.lora, field, value)
        with pytest.raises(ConfigError, match=r"lora\.vision_targets"):
            adapter_checks.check_lora(RunSpec.of(config))


def _loss_and_adapter_grads(path, spec: LoRASpec, mesh, batch: dict, images) -> tuple:
    """(loss, adapter gradients) of `batch` (rows split over data x fsdp) on `mesh`, the
    adapters made as on one device; images(batch) -> the model's images=."""
    model = from_pretrained(path, mesh=mesh)
    apply_lora(model, spec, mesh)
    _randomize_adapters(model)
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    placed = {name: jax.device_put(array, rows) for name, array in batch.items()}

    def loss(m, b):
        ids, segments = b["input_ids"], b["segment_ids"]
        hidden = m.hidden_states(ids, b["positions"], segments, images=images(b))
        logp = jax.nn.log_softmax(m.logits(hidden)[:, :-1])
        picked = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
        real = (segments[:, 1:] > 0).astype(jnp.float32)
        return -jnp.sum(picked * real) / real.sum()

    grad = nnx.value_and_grad(loss, argnums=nnx.DiffState(0, LoRAParam))
    value, grads = nnx.jit(grad)(model, placed)
    return float(value), jax.tree.map(np.asarray, nnx.to_pure_dict(grads))


def _assert_sharded_equals_one_device(path, spec: LoRASpec, batch: dict, images) -> dict:
    """data 2 x fsdp 2 x tensor 2 on 8 devices against one device; the one device's grads."""
    single_loss, single = _loss_and_adapter_grads(path, spec, single_device_mesh(), batch, images)
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    sharded_loss, sharded = _loss_and_adapter_grads(path, spec, mesh, batch, images)
    np.testing.assert_allclose(sharded_loss, single_loss, rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), sharded, single
    )
    return single


def test_gemma3_vision_adapters_sharded_equal_one_device(setup):  # noqa: F811
    """Gemma 3 with adapters on every vision linear and q/v_proj, 4 rows, on 8 devices (the
    adapters split like their kernels): one device's loss and adapter gradients."""
    path, _, docs = setup
    seq_len, rows_docs = 24, [*docs, docs[1]]
    batch = {name: np.zeros((4, seq_len), np.int32) for name in ("input_ids", "segment_ids")}
    for row, document in enumerate(rows_docs):
        batch["input_ids"][row, : len(document["input_ids"])] = document["input_ids"]
        batch["segment_ids"][row, : len(document["input_ids"])] = 1
    batch["positions"] = np.broadcast_to(np.arange(seq_len, dtype=np.int32), (4, seq_len))
    vision = from_hf_config(transformers.AutoConfig.from_pretrained(path)).vision
    batch["pixel_values"] = np.stack(
        [row_images([d], 2, vision)["pixel_values"] for d in rows_docs]
    )
    spec = LoRASpec(rank=2, alpha=4.0, dropout=0.0, targets=("q_proj", "v_proj"))
    spec = dataclasses.replace(spec, vision_targets=vision_lora.GEMMA3_TARGETS)
    single = _assert_sharded_equals_one_device(
        path, spec, batch, lambda b: {"pixel_values": b["pixel_values"]}
    )
    assert np.abs(single["vision"]["projection"]["lora_a"]).max() > 0


@pytest.mark.e2e  # the ViT was split by these rules before; Gemma 3's test is the fast one
def test_qwen_vl_vision_adapters_sharded_equal_one_device(checkpoint, documents):  # noqa: F811
    """Qwen2.5-VL with adapters on the ViT and merger and q_proj, 4 rows (one packing two
    documents), on 8 devices: one device's loss and adapter gradients."""
    path, _ = checkpoint
    vision = from_hf_config(transformers.AutoConfig.from_pretrained(path)).vision
    a, b, c = documents
    batch = _rows(vision, [[a], [b], [c], [a, c]])
    spec = LoRASpec(rank=2, alpha=4.0, dropout=0.0, targets=("q_proj",))
    spec = dataclasses.replace(spec, vision_targets=vision_lora.QWEN_VL_TARGETS)
    fields = (*IMAGE_FIELDS, *MROPE)
    single = _assert_sharded_equals_one_device(
        path, spec, batch, lambda b: {name: b[name] for name in fields}
    )
    assert np.abs(single["vision"]["merger"]["fc2"]["lora_a"]).max() > 0
