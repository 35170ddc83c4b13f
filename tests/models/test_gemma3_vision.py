"""Gemma 3's image-text model (Gemma3ForConditionalGeneration) against transformers: the SigLIP
tower, the pool and projector, soft tokens in place, images attending bidirectionally within
themselves, on padded and packed rows laid out by row_images from the real processor's output;
the export transformers loads back; what is refused."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from chat_tokenizers import pieces, word_level
from flax import nnx
from safetensors import safe_open

from sft_jax.adapters.lora import LoRASpec, apply_lora, merged, save_adapter
from sft_jax.core import batch
from sft_jax.core.errors import UserError
from sft_jax.models import image_rows
from sft_jax.models.config import UnsupportedModelError, from_hf_config
from sft_jax.models.decoder import use_attention
from sft_jax.models.gemma3_images import image_runs, per_row_shapes, row_images
from sft_jax.models.io import gemma3_vision as vision_io
from sft_jax.models.io import hf
from sft_jax.models.layers import TRAINABLE
from sft_jax.models.partitioning import single_device_mesh
from sft_jax.train import sharding

IMAGE, BOI = "<image_soft_token>", "<start_of_image>"
SPECIALS = ["<bos>", "<eos>", BOI, IMAGE, "<end_of_image>"]
WORDS = "a cat on the mat what is this describe and two images"
TOKENS_PER_IMAGE = 4
# The conversations: one image, two images, text only.
TEXTS = (f"describe {BOI} what is this", f"{BOI} and {BOI} two images", "what is this a cat")
IMAGE_COUNTS = (1, 2, 0)


def tiny_processor() -> transformers.Gemma3Processor:
    """A word-level tokenizer with Gemma 3's image tokens and the real image processor at
    28 x 28 pixels, 4 soft tokens per image."""
    backend = word_level([*pieces(WORDS), " ", "\n", "\n\n"], SPECIALS)
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        unk_token="<unk>", extra_special_tokens={
            "boi_token": BOI, "image_token": IMAGE, "eoi_token": "<end_of_image>"},
    )  # fmt: skip
    images = transformers.Gemma3ImageProcessorPil(size={"height": 28, "width": 28})
    return transformers.Gemma3Processor(
        image_processor=images, tokenizer=tokenizer, image_seq_length=TOKENS_PER_IMAGE
    )


def tiny_config(tokenizer, text_fields: dict | None = None, **vision: object):
    text = {
        "vocab_size": 32, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "query_pre_attn_scalar": 24, "sliding_window": 3,
        "layer_types": ["sliding_attention", "full_attention"], "max_position_embeddings": 128,
        **(text_fields or {}),
    }  # fmt: skip
    # 28 / 7 = 4 patches a side, pooled 2 x 2 into 4 soft tokens.
    vision_config = {
        "hidden_size": 24, "intermediate_size": 40, "num_hidden_layers": 2,
        "num_attention_heads": 2, "image_size": 28, "patch_size": 7, "vision_use_head": False,
        **vision,
    }  # fmt: skip
    return transformers.Gemma3Config(
        text_config=text,
        vision_config=vision_config,
        mm_tokens_per_image=TOKENS_PER_IMAGE,
        image_token_index=tokenizer.image_token_id,
        boi_token_index=tokenizer.boi_token_id,
        eoi_token_index=tokenizer.eoi_token_id,
    )


def randomized(config: transformers.Gemma3Config, seed: int = 0):
    """Large random weights: LayerNorm scales near 1, Gemma's (1 + w) norms near 0."""
    torch.manual_seed(seed)
    model = transformers.Gemma3ForConditionalGeneration(config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            layer_norm = "vision_tower" in name and "norm" in name and name.endswith("weight")
            noise = torch.randn(param.shape, generator=generator) * 0.1
            param.copy_(noise + (1.0 if layer_norm else 0.0))
    return model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(checkpoint directory, transformers model, processor outputs of the conversations)."""
    processor = tiny_processor()
    model = randomized(tiny_config(processor.tokenizer))
    path = tmp_path_factory.mktemp("gemma3_vision")
    model.save_pretrained(path)
    rng = np.random.RandomState(0)
    documents = []
    for text, count in zip(TEXTS, IMAGE_COUNTS, strict=True):
        images = [rng.randint(0, 255, (40, 30, 3)).astype(np.uint8) for _ in range(count)]
        out = processor(text=text, images=[images] if images else None, return_tensors="np")
        arrays = {name: np.asarray(value) for name, value in out.items()}
        documents.append({k: v if k == "pixel_values" else v[0] for k, v in arrays.items()})
    return path, model, documents


@pytest.fixture(scope="module")
def loaded(setup):
    """sft_jax's model loaded from the checkpoint (tests that change a model load their own)."""
    return hf.from_pretrained(setup[0])


def transformers_logits(model, document: dict, bidirectional: bool = True) -> np.ndarray:
    """transformers' logits [L, V] of one document alone (bidirectional=False: without
    token_type_ids, image tokens attend causally)."""
    ids = torch.as_tensor(document["input_ids"][None], dtype=torch.long)
    pixels = document.get("pixel_values")
    with torch.no_grad():
        return (
            model(
                input_ids=ids,
                pixel_values=None if pixels is None else torch.as_tensor(pixels),
                token_type_ids=(
                    torch.as_tensor(document["token_type_ids"][None]) if bidirectional else None
                ),
                attention_mask=torch.ones_like(ids),
            )
            .logits[0]
            .numpy()
        )


@nnx.jit
def _logits(model, ids_BxT, positions_BxT, segments_BxT, pixels):
    images = {"pixel_values": pixels}
    return model.logits(model.hidden_states(ids_BxT, positions_BxT, segments_BxT, images=images))


def our_logits(model, ids_BxT, positions_BxT, segments_BxT, pixels) -> np.ndarray:
    arrays = [jnp.asarray(a, jnp.int32) for a in (ids_BxT, positions_BxT, segments_BxT)]
    return np.asarray(_logits(model, *arrays, jnp.asarray(pixels)))


def assert_close(ours: np.ndarray, reference: np.ndarray) -> float:
    """Max |diff| relative to the reference's largest logit; asserts it is below 1e-4."""
    relative = float(np.abs(ours - reference).max() / np.abs(reference).max())
    assert relative < 1e-4, relative
    return relative


def test_row_images_from_processor(setup):
    """The row layout from the processor's outputs: images in row order, zeros after."""
    path, _, documents = setup
    spec = from_hf_config(transformers.AutoConfig.from_pretrained(path)).vision
    assert [len(image_runs(d["input_ids"], spec.image_token_id)) for d in documents] == [1, 2, 0]
    row = row_images([documents[0], documents[2], documents[1]], 4, spec)["pixel_values"]
    assert row.shape == per_row_shapes(spec, 4)["pixel_values"] == (4, 3, 28, 28)
    np.testing.assert_array_equal(row[0], documents[0]["pixel_values"][0])
    np.testing.assert_array_equal(row[1:3], documents[1]["pixel_values"])
    assert not row[3].any()
    assert batch.shape("pixel_values", 2, 64, per_row_shapes(spec, 4)) == (2, 4, 3, 28, 28)
    with pytest.raises(UserError, match="more than its 2 image slots"):
        row_images([documents[0], documents[1]], 2, spec)
    cut = {**documents[1], "input_ids": documents[1]["input_ids"][:-8]}
    with pytest.raises(UserError, match="image-token runs of lengths"):
        row_images([cut], 2, spec)
    # What the data layer packs through: the family's layout, found by its vision config.
    config = from_hf_config(transformers.AutoConfig.from_pretrained(path))
    layout = image_rows.layout_of(config, image_rows.ImageBudget(64, 4, 4096))
    assert layout.per_row == per_row_shapes(spec, 4) and layout.fields == ("pixel_values",)
    lengths = {"pixel_values": np.asarray([len(d.get("pixel_values", ())) for d in documents])}
    images, patches = layout.cost(lengths)
    assert images.tolist() == [1, 2, 0] and not patches.any()
    via_layout = layout.row([documents[0], documents[2], documents[1]])["pixel_values"]
    np.testing.assert_array_equal(via_layout, row)


def test_padded_batch_matches_transformers(setup, loaded):
    """One image, two images and a text-only conversation, right-padded in one batch: each
    row's logits equal transformers' on the conversation alone (whose image tokens attending
    only causally would differ)."""
    _, reference, documents = setup
    model = loaded
    spec = model.config.vision
    seq_len = max(len(d["input_ids"]) for d in documents) + 3
    ids, segments = np.zeros((3, seq_len), np.int32), np.zeros((3, seq_len), np.int32)
    for row, document in enumerate(documents):
        ids[row, : len(document["input_ids"])] = document["input_ids"]
        segments[row, : len(document["input_ids"])] = 1
    pixels = np.stack([row_images([d], 2, spec)["pixel_values"] for d in documents])
    positions = np.broadcast_to(np.arange(seq_len), ids.shape)
    logits = our_logits(model, ids, positions, segments, pixels)
    for row, document in enumerate(documents):
        length = len(document["input_ids"])
        expected = transformers_logits(reference, document)
        assert_close(logits[row, :length], expected)
        if row < 2:  # with images: the bidirectional blocks matter
            causal = transformers_logits(reference, document, bidirectional=False)
            assert np.abs(causal - expected).max() > 1e-2


def test_packed_documents_match_alone(setup, loaded):
    """The three conversations packed in one row (text-only in the middle): each document's
    logits equal transformers' on it alone."""
    _, reference, documents = setup
    model = loaded
    order = [documents[0], documents[2], documents[1]]
    ids = np.concatenate([d["input_ids"] for d in order] + [np.zeros(5, np.int64)])
    segments = np.concatenate(
        [np.full(len(d["input_ids"]), i + 1) for i, d in enumerate(order)] + [np.zeros(5)]
    )
    positions = np.concatenate([np.arange(len(d["input_ids"])) for d in order] + [np.arange(5)])
    pixels = row_images(order, 4, model.config.vision)["pixel_values"]
    logits = our_logits(model, ids[None], positions[None], segments[None], pixels[None])[0]
    start = 0
    for document in order:
        length = len(document["input_ids"])
        assert_close(logits[start : start + length], transformers_logits(reference, document))
        start += length


def test_export_reloads_in_transformers(setup, loaded, tmp_path):
    """Our export in the hub's layout: transformers loads it with no missing or unexpected
    tensor and gives the same logits on image inputs; sft_jax reads it back too."""
    _, reference, documents = setup
    hf.save_pretrained(loaded, tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "np") as f:
        names = set(f.keys())
    assert "vision_tower.vision_model.embeddings.patch_embedding.weight" in names
    assert "language_model.model.embed_tokens.weight" in names
    assert "multi_modal_projector.mm_input_projection_weight" in names
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "gemma3" and config["vision_config"]["patch_size"] == 7
    reloaded, info = transformers.Gemma3ForConditionalGeneration.from_pretrained(
        tmp_path, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    for document in documents[:2]:
        assert_close(
            transformers_logits(reloaded.eval(), document),
            transformers_logits(reference, document),
        )
    again = hf.from_pretrained(tmp_path)
    document = documents[1]
    length = len(document["input_ids"])
    ids = document["input_ids"][None]
    pixels = row_images([document], 2, again.config.vision)["pixel_values"][None]
    logits = our_logits(again, ids, np.arange(length)[None], np.ones((1, length)), pixels)
    assert_close(logits[0], transformers_logits(reference, document))


def test_refusals(setup):
    """Fields and kernels sft_jax does not implement are refused by name."""
    path, _, documents = setup
    tokenizer = tiny_processor().tokenizer
    with pytest.raises(UnsupportedModelError, match=r"vision_config\.vision_use_head"):
        from_hf_config(tiny_config(tokenizer, vision_use_head=True))
    with pytest.raises(UnsupportedModelError, match=r"vision_config\.hidden_act"):
        from_hf_config(tiny_config(tokenizer, hidden_act="gelu"))
    with pytest.raises(UnsupportedModelError, match=r"text_config\.final_logit_softcapping"):
        from_hf_config(tiny_config(tokenizer, {"final_logit_softcapping": 3.0}))
    model = hf.from_pretrained(path)
    use_attention(model, "blockwise")
    document = documents[0]
    length = len(document["input_ids"])
    pixels = row_images([document], 1, model.config.vision)["pixel_values"][None]
    with pytest.raises(UnsupportedModelError, match="bidirectionally within images"):
        our_logits(
            model,
            document["input_ids"][None],
            np.arange(length)[None],
            np.ones((1, length)),
            pixels,
        )


def test_lora_on_language_model_matches_peft(setup, tmp_path):
    """LoRA on the language model's q_proj and v_proj (the vision tower untouched): PEFT's
    adapter loaded on transformers' model and our merged export both give our logits on image
    inputs; full fine-tuning leaves the tower and projector frozen."""
    path, reference, documents = setup
    model = hf.from_pretrained(path)
    assert not any(p[0] == "vision" for p, _ in nnx.to_flat_state(nnx.state(model, TRAINABLE)))
    spec = LoRASpec(rank=2, alpha=4.0, targets=("q_proj", "v_proj"))
    apply_lora(model, spec, single_device_mesh())
    keys = iter(jax.random.split(jax.random.key(1), 8))
    for layer in model.layers:
        for linear in (layer.attn.q_proj, layer.attn.v_proj):
            linear.lora_b[...] = 0.3 * jax.random.normal(next(keys), linear.lora_b[...].shape)
    document = documents[1]
    length = len(document["input_ids"])
    pixels = row_images([document], 2, model.config.vision)["pixel_values"][None]
    args = (document["input_ids"][None], np.arange(length)[None], np.ones((1, length)), pixels)
    ours = our_logits(model, *args)[0]
    assert not np.allclose(ours, transformers_logits(reference, document), atol=1e-3)
    save_adapter(model, tmp_path / "adapter", spec, base_model=str(path))
    base = transformers.Gemma3ForConditionalGeneration.from_pretrained(path)
    adapted = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    wrapped = [n for n, _ in adapted.named_modules() if n.endswith("q_proj.lora_A")]
    assert len(wrapped) == 2 and all("language_model" in n for n in wrapped)
    assert_close(ours, transformers_logits(adapted, document))
    hf.save_pretrained(merged(model), tmp_path / "merged")
    reloaded = transformers.Gemma3ForConditionalGeneration.from_pretrained(tmp_path / "merged")
    assert_close(ours, transformers_logits(reloaded.eval(), document))


def test_pan_and_scan_crops_match_transformers(setup, loaded):
    """The processor's do_pan_and_scan=True: a wide image and its crops, each a run of image
    tokens, laid out by row_images, give transformers' logits."""
    _, reference, _ = setup
    model = loaded
    image = np.random.RandomState(1).randint(0, 255, (30, 90, 3)).astype(np.uint8)
    out = tiny_processor()(
        text=f"describe {BOI} what", images=[[image]], do_pan_and_scan=True,
        pan_and_scan_min_crop_size=4, return_tensors="np",
    )  # fmt: skip
    document = {name: np.asarray(value)[0] for name, value in out.items() if name != "pixel_values"}
    document["pixel_values"] = out["pixel_values"]
    crops = len(document["pixel_values"])
    assert (
        crops > 1
        and len(image_runs(document["input_ids"], model.config.vision.image_token_id)) == crops
    )
    length = len(document["input_ids"])
    pixels = row_images([document], crops, model.config.vision)["pixel_values"][None]
    ids, positions = document["input_ids"][None], np.arange(length)[None]
    logits = our_logits(model, ids, positions, np.ones((1, length)), pixels)
    assert_close(logits[0], transformers_logits(reference, document))


def test_both_checkpoint_spellings_read_alike():
    """The hub's names and transformers' in-memory names read as the same tensors; an export
    writes the hub's."""
    hub = [
        "language_model.model.layers.0.self_attn.q_proj.weight",
        "language_model.lm_head.weight",
        "vision_tower.vision_model.encoder.layers.1.mlp.fc1.bias",
        "multi_modal_projector.mm_input_projection_weight",
    ]
    in_memory = [
        "model.language_model.layers.0.self_attn.q_proj.weight",
        "lm_head.weight",
        "model.vision_tower.encoder.layers.1.mlp.fc1.bias",
        "model.multi_modal_projector.mm_input_projection_weight",
    ]
    reading = list(vision_io.checkpoint_tensors(dict.fromkeys(hub)))
    assert reading == list(vision_io.checkpoint_tensors(dict.fromkeys(in_memory)))
    assert reading[0] == "model.layers.0.self_attn.q_proj.weight"
    assert [vision_io.hub_name(name) for name in reading] == hub


def test_sharded_loss_and_gradients_equal_one_device(setup, loaded):
    """data=2 x fsdp=2 x tensor=2 on 8 fake devices, rows and their images split over the batch
    axes: the same loss and gradients (tower and projector included) as one device."""
    path, _, documents = setup
    seq_len = 24
    rows_documents = [*documents, documents[1]]  # 4 rows: one per data x fsdp shard
    ids, segments = np.zeros((4, seq_len), np.int32), np.zeros((4, seq_len), np.int32)
    for row, document in enumerate(rows_documents):
        ids[row, : len(document["input_ids"])] = document["input_ids"]
        segments[row, : len(document["input_ids"])] = 1
    pixels = np.stack(
        [row_images([d], 2, loaded.config.vision)["pixel_values"] for d in rows_documents]
    )
    positions = np.broadcast_to(np.arange(seq_len), ids.shape).astype(np.int32)
    arrays = {"ids": ids, "positions": positions, "segments": segments, "pixels": pixels}

    def loss(m, batch):
        images = {"pixel_values": batch["pixels"]}
        hidden = m.hidden_states(batch["ids"], batch["positions"], batch["segments"], images=images)
        logp = jax.nn.log_softmax(m.logits(hidden)[:, :-1], axis=-1)
        picked = jnp.take_along_axis(logp, batch["ids"][:, 1:, None], axis=-1)[..., 0]
        real = batch["segments"][:, 1:]
        return -jnp.sum(picked * real) / real.sum()

    def loss_and_grads(model, batch) -> tuple[float, dict]:
        value, grads = nnx.jit(nnx.value_and_grad(loss))(model, batch)
        return float(value), jax.tree.map(np.asarray, nnx.to_pure_dict(grads))

    single_loss, single_grads = loss_and_grads(loaded, arrays)
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    placed = {name: jax.device_put(array, rows) for name, array in arrays.items()}
    sharded_loss, sharded_grads = loss_and_grads(hf.from_pretrained(path, mesh=mesh), placed)
    np.testing.assert_allclose(sharded_loss, single_loss, rtol=1e-5)
    assert np.abs(single_grads["vision"]["projection"]["kernel"]).max() > 0
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
        sharded_grads,
        single_grads,
    )
