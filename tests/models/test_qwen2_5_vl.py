"""Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`): the vision transformer (windowed and full
blocks, 2-D RoPE, the 2 x 2 merger), M-RoPE, the image embeddings at the image tokens, loading
and export, against transformers on a tiny random model (float32) whose inputs come from the
real image processor (Qwen2VLImageProcessorPil, tiny sizes) through qwen_vl_rows.row_images.

Documents: A (one image), B (two images of other sizes, text between and after), C (text
only). Padded: one row each; packed: A, B and C in one row, each equal to itself alone."""

from __future__ import annotations

import jax
import numpy as np
import peft
import pytest
import torch
import transformers
from flax import nnx

from sft_jax.adapters.lora import LoRASpec, apply_lora, save_adapter
from sft_jax.adapters.lora import merged as fold_adapters
from sft_jax.core import batch as batch_schema
from sft_jax.models import UnsupportedModelError, from_hf_config, from_pretrained, save_pretrained
from sft_jax.models.decoder import decoder_linears
from sft_jax.models.qwen_vl_rows import (
    IMAGE_FIELDS,
    MROPE,
    ImageLayoutError,
    RowBudget,
    mrope_positions,
    row_images,
    window_numbers,
)
from sft_jax.train import sharding

IMAGE, VIDEO, START, END = 120, 121, 122, 123
TEXT_CONFIG = {
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e4},
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}
VISION_CONFIG = {
    "depth": 3,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_heads": 2,
    "patch_size": 4,
    "temporal_patch_size": 2,
    "spatial_merge_size": 2,
    "window_size": 16,  # windows of 2 x 2 merged tokens
    "out_hidden_size": 64,
    "fullatt_block_indexes": [1],
}
# Image sizes (height, width) in pixels: grids (1, 8, 12), (1, 4, 4) and (1, 6, 10) patches, the
# last cut by the windows' edge (3 x 5 merged tokens in windows of 2 x 2).
SIZES = ((32, 48), (16, 16), (24, 40))
SEQ_LEN, MAX_PATCHES, MAX_IMAGES = 80, 176, 3
BATCH_KEYS = ("input_ids", "positions", "segment_ids")


def hf_vl_config(**text_overrides) -> transformers.Qwen2_5_VLConfig:
    return transformers.Qwen2_5_VLConfig(
        text_config={**TEXT_CONFIG, **text_overrides},
        vision_config=dict(VISION_CONFIG),
        image_token_id=IMAGE,
        video_token_id=VIDEO,
        vision_start_token_id=START,
        vision_end_token_id=END,
    )


def _randomized(model: torch.nn.Module) -> torch.nn.Module:
    """Weights large enough that every parameter shows in the logits; norms near one."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * 0.1
            param.copy_(noise + (1.0 if "norm" in name or "ln_q" in name else 0.0))
    return model.eval().float()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = transformers.Qwen2_5_VLForConditionalGeneration(hf_vl_config())
    model = _randomized(model)
    path = tmp_path_factory.mktemp("qwen2_5_vl")
    model.save_pretrained(path)
    return path, model


@pytest.fixture(scope="module")
def model(checkpoint):
    return from_pretrained(checkpoint[0])


@pytest.fixture(scope="module")
def documents():
    """Three documents as the processor would give them: A (one image), B (two), C (text)."""
    processor = transformers.Qwen2VLImageProcessorPil(
        patch_size=4, temporal_patch_size=2, merge_size=2, min_pixels=64, max_pixels=64 * 64
    )
    rng = np.random.default_rng(0)
    images = [(rng.random((*size, 3)) * 255).astype(np.uint8) for size in SIZES]

    def document(text_runs: list[int], image_list: list[np.ndarray]) -> dict[str, np.ndarray]:
        processed = processor(images=image_list, return_tensors="np") if image_list else {}
        grids = processed.get("image_grid_thw", np.zeros((0, 3), np.int64))
        ids = list(rng.integers(3, 100, text_runs[0]))
        for grid, run in zip(grids, text_runs[1:], strict=True):
            ids += [START, *[IMAGE] * (int(np.prod(grid)) // 4), END]
            ids += list(rng.integers(3, 100, run))
        out = {"input_ids": np.asarray(ids, np.int64)}
        if image_list:
            out["pixel_values"] = processed["pixel_values"]
            out["image_grid_thw"] = grids
        return out

    return [document([5, 4], images[:1]), document([3, 2, 3], images[1:]), document([7], [])]


def _hf_logits(model, docs: list[dict[str, np.ndarray]]) -> np.ndarray:
    with torch.no_grad():
        return _hf_forward(model, docs).numpy()


def _hf_forward(model, docs: list[dict[str, np.ndarray]]) -> torch.Tensor:
    """transformers' logits of the documents as right-padded rows of one batch."""
    length = max(len(d["input_ids"]) for d in docs)
    ids = np.zeros((len(docs), length), np.int64)
    mask = np.zeros_like(ids)
    for row, d in enumerate(docs):
        ids[row, : len(d["input_ids"])], mask[row, : len(d["input_ids"])] = d["input_ids"], 1
    kwargs = {}
    with_images = [d for d in docs if "pixel_values" in d]
    if with_images:
        kwargs["pixel_values"] = torch.tensor(
            np.concatenate([d["pixel_values"] for d in with_images])
        )
        kwargs["image_grid_thw"] = torch.tensor(
            np.concatenate([d["image_grid_thw"] for d in with_images])
        )
    return model(
        input_ids=torch.tensor(ids),
        attention_mask=torch.tensor(mask),
        mm_token_type_ids=torch.tensor((ids == IMAGE).astype(np.int64)),
        **kwargs,
    ).logits


def _rows(spec, rows: list[list[dict[str, np.ndarray]]]) -> dict[str, np.ndarray]:
    """Our batch: each row the given documents packed in order, through row_images."""
    budget = RowBudget(SEQ_LEN, MAX_PATCHES, MAX_IMAGES)
    per_row = [row_images(docs, budget, spec) for docs in rows]
    batch = {name: np.stack([r[name] for r in per_row]) for name in (*IMAGE_FIELDS, *MROPE)}
    ids, positions, segments = (np.zeros((len(rows), SEQ_LEN), np.int32) for _ in range(3))
    for row, docs in enumerate(rows):
        start = 0
        for number, d in enumerate(docs, 1):
            span = slice(start, start + len(d["input_ids"]))
            ids[row, span] = d["input_ids"]
            positions[row, span] = np.arange(len(d["input_ids"]))
            segments[row, span] = number
            start = span.stop
    return {**batch, "input_ids": ids, "positions": positions, "segment_ids": segments}


@nnx.jit
def _forward(model, ids, positions, segment_ids, images):
    return model.logits(model.hidden_states(ids, positions, segment_ids, images=images))


def _our_logits(model, batch: dict[str, np.ndarray]) -> np.ndarray:
    images = {name: batch[name] for name in (*IMAGE_FIELDS, *MROPE)}
    ids, positions, segments = batch["input_ids"], batch["positions"], batch["segment_ids"]
    return np.asarray(_forward(model, ids, positions, segments, images))


def _max_rel(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def test_padded_rows_match_transformers(checkpoint, model, documents):
    """A, B, C as right-padded rows of one batch (1 and 2 images of 3 grid sizes, text only)."""
    hf_model = checkpoint[1]
    batch = _rows(model.config.vision, [[d] for d in documents])
    ours = _our_logits(model, batch)
    expected = _hf_logits(hf_model, documents)
    for row, d in enumerate(documents):
        n = len(d["input_ids"])
        assert _max_rel(ours[row, :n], expected[row, :n]) < 1e-4, row


def test_packed_documents_each_equal_alone(checkpoint, model, documents):
    hf_model = checkpoint[1]
    order = [documents[1], documents[2], documents[0]]
    ours = _our_logits(model, _rows(model.config.vision, [order]))[0]
    start = 0
    for d in order:
        n = len(d["input_ids"])
        alone = _hf_logits(hf_model, [d])[0]
        assert _max_rel(ours[start : start + n], alone) < 1e-4
        start += n


def test_text_without_images_matches_transformers(checkpoint, model, documents):
    """Text alone needs no image fields: 1-D positions turn the heads as M-RoPE does."""
    text = documents[2]
    batch = _rows(model.config.vision, [[text]])
    forward = nnx.jit(lambda m, ids, pos, seg: m(ids, pos, seg))
    ours = forward(model, batch["input_ids"], batch["positions"], batch["segment_ids"])
    n = len(text["input_ids"])
    assert _max_rel(np.asarray(ours)[0, :n], _hf_logits(checkpoint[1], [text])[0]) < 1e-4


def test_hub_config_json_reads():
    """The hub's config.json layout (Qwen2.5-VL-7B-Instruct's fields: the text model's at the
    top level, rope_scaling of type "mrope"), at a tiny size."""
    hub = {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        **{k: v for k, v in TEXT_CONFIG.items() if k != "rope_parameters"},
        "rope_theta": 1e6,
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
        "image_token_id": IMAGE,
        "video_token_id": VIDEO,
        "vision_config": {**VISION_CONFIG, "in_chans": 3, "tokens_per_second": 2},
    }
    config = from_hf_config(transformers.AutoConfig.for_model(**hub))
    rope = config.rope_for("full_attention")
    assert (rope.rope_type, rope.theta, rope.mrope_section) == ("default", 1e6, (2, 3, 3))
    assert config.vision.image_token_id == IMAGE and config.vision.patch_dim == 96
    assert (config.num_layers, config.hidden_size, config.vision.depth) == (2, 64, 3)


def test_each_part_shows_in_the_logits(checkpoint, model, documents):
    """The image embeddings, M-RoPE, the windows, their order and the vision RoPE each move the
    logits far beyond the parity tolerance: the parity tests see them all."""
    batch = _rows(model.config.vision, [[documents[0]]])
    n = len(documents[0]["input_ids"])
    expected = _hf_logits(checkpoint[1], [documents[0]])[0]
    changes = {
        "no image": {"vision_patches": np.zeros_like(batch["vision_patches"])},
        "1-D RoPE": {name: batch["positions"] for name in MROPE},
        "windows of whole images": {"vision_window_ids": batch["vision_image_ids"]},
        "no window order": {"vision_window_order": np.arange(MAX_PATCHES)[None]},
        "no vision RoPE": {
            "vision_patch_positions": np.zeros_like(batch["vision_patch_positions"])
        },
    }
    assert len(np.unique(batch["vision_window_ids"])) == 7  # 6 windows and the padding
    for what, change in changes.items():
        assert _max_rel(_our_logits(model, {**batch, **change})[0, :n], expected) > 1e-3, what


def test_gradients_match_transformers(checkpoint, model, documents):
    """Gradients of a weighted sum of the logits (rows A and B) reach the vision part as in
    transformers: patch embedding, a windowed and a full block, the merger, the decoder."""
    hf_model, docs = checkpoint[1], documents[:2]
    batch = _rows(model.config.vision, [[d] for d in docs])
    images = {name: batch[name] for name in (*IMAGE_FIELDS, *MROPE)}
    weights = np.random.default_rng(1).normal(size=(2, SEQ_LEN, 128)).astype(np.float32)
    for row, d in enumerate(docs):
        weights[row, len(d["input_ids"]) :] = 0
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def grads(params):
        def loss(params):
            m = nnx.merge(graphdef, params, rest)
            logits = m.logits(m.hidden_states(*(batch[k] for k in BATCH_KEYS), images=images))
            return (logits * weights).sum()

        return jax.grad(loss)(params)

    ours = nnx.to_flat_state(grads(params))
    hf_model.zero_grad()
    logits = _hf_forward(hf_model, docs)
    (logits * torch.tensor(weights[:, : logits.shape[1]])).sum().backward()
    hf_grads = dict(hf_model.named_parameters())
    checked = {
        ("vision", "patch_embed", "kernel"): "model.visual.patch_embed.proj.weight",
        ("vision", "blocks", 0, "attn", "qkv", "kernel"): "model.visual.blocks.0.attn.qkv.weight",
        ("vision", "blocks", 1, "attn", "qkv", "kernel"): "model.visual.blocks.1.attn.qkv.weight",
        ("vision", "merger", "fc1", "kernel"): "model.visual.merger.mlp.0.weight",
        (
            "layers",
            0,
            "attn",
            "q_proj",
            "kernel",
        ): "model.language_model.layers.0.self_attn.q_proj.weight",
    }
    by_path = dict(ours)
    for path, name in checked.items():
        expected = hf_grads[name].grad.reshape(hf_grads[name].shape[0], -1).T.numpy()
        assert _max_rel(np.asarray(by_path[path].get_value()), expected) < 1e-4, name


def test_export_reloads_in_transformers(checkpoint, model, documents, tmp_path):
    """Our export is in the hub's layout (visual.*, model.layers.*): transformers loads it
    with nothing missing and equal logits, and so does sft_jax."""
    hf_model = checkpoint[1]
    save_pretrained(model, tmp_path)
    reloaded, info = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        tmp_path, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    docs = documents[:2]
    expected = _hf_logits(hf_model, docs)
    assert _max_rel(_hf_logits(reloaded.eval().float(), docs), expected) < 1e-6
    ours = _our_logits(from_pretrained(tmp_path), _rows(model.config.vision, [[d] for d in docs]))
    for row, d in enumerate(docs):
        n = len(d["input_ids"])
        assert _max_rel(ours[row, :n], expected[row, :n]) < 1e-4


def test_windows_equal_transformers_window_index():
    """Our per-patch windows and window order are transformers' (get_vision_window_index's
    window index and cu_window_seqlens), for grids cut and not cut by the windows' edge."""
    from transformers.vision_utils import get_vision_window_index

    spec = from_hf_config(hf_vl_config()).vision
    for grid in ((1, 8, 12), (1, 6, 10), (1, 4, 4), (1, 2, 6)):
        order, cu = get_vision_window_index(torch.tensor([grid]), 2, 16, 4)
        units = np.asarray(order)
        window_of_unit = np.searchsorted(np.asarray(cu)[1:], np.arange(len(units)) * 4, "right")
        expected = np.empty(len(units), np.int64)
        expected[units] = window_of_unit
        ours = window_numbers(np.asarray(grid), spec)[::4]
        # Same partition, the same numbering (both go through the windows row by row).
        np.testing.assert_array_equal(ours, expected)
        # And the same window order of the patches (row_images' vision_window_order).
        document = {
            "input_ids": np.full(np.prod(grid) // 4, IMAGE),
            "pixel_values": np.zeros((np.prod(grid), spec.patch_dim), np.float32),
            "image_grid_thw": np.asarray([grid]),
        }
        order = row_images([document], RowBudget(64, 128, 1), spec)["vision_window_order"]
        np.testing.assert_array_equal(order[: np.prod(grid) : 4] // 4, units)


def test_positions_equal_transformers(checkpoint, model, documents):
    """row_images' M-RoPE positions (each packed document from 0) are get_rope_index's of
    each document alone, and its patch positions get_vision_position_ids' of the row."""
    from transformers.vision_utils import get_vision_position_ids

    order = [documents[1], documents[2], documents[0]]
    batch = _rows(model.config.vision, [order])
    ours = np.stack([batch[name][0] for name in MROPE])
    start = 0
    for d in order:
        ids = torch.tensor(d["input_ids"])[None]
        grids = torch.tensor(d["image_grid_thw"]) if "image_grid_thw" in d else None
        expected, _ = checkpoint[1].model.get_rope_index(ids, (ids == IMAGE).long(), grids)
        np.testing.assert_array_equal(ours[:, start : start + ids.shape[1]], expected[:, 0])
        start += ids.shape[1]
    grids = torch.tensor(
        np.concatenate([d["image_grid_thw"] for d in order if "image_grid_thw" in d])
    )
    expected = get_vision_position_ids(grids, 2).numpy()
    np.testing.assert_array_equal(batch["vision_patch_positions"][0, : len(expected)], expected)


def test_config_and_batch_fields():
    config = from_hf_config(hf_vl_config())
    assert config.vision.fullatt_block_indexes == (1,) and config.vision.window_units == 2
    assert config.rope_for("full_attention").mrope_section == (2, 3, 3)
    assert config.qkv_bias and not config.o_bias
    for name in IMAGE_FIELDS:
        assert batch_schema.FIELDS[name].kind == batch_schema.IMAGE
    for name in MROPE:
        assert batch_schema.FIELDS[name].kind == batch_schema.TOKEN
    budget = RowBudget(SEQ_LEN, MAX_PATCHES, MAX_IMAGES)
    shape = batch_schema.shape("vision_patches", 4, SEQ_LEN, budget.per_row(config.vision))
    assert shape == (4, MAX_PATCHES, 96)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"text_config": {**TEXT_CONFIG, "use_sliding_window": True}}, "use_sliding_window"),
        ({"vision_config": {**VISION_CONFIG, "hidden_act": "quick_gelu"}}, "hidden_act"),
        ({"text_config": {**TEXT_CONFIG, "rope_parameters": {
            "rope_type": "default", "mrope_section": [2, 2, 2], "rope_theta": 1e4}}},
         "mrope_section"),
    ],
)  # fmt: skip
def test_refused_by_name(change, field):
    kwargs = {"text_config": TEXT_CONFIG, "vision_config": VISION_CONFIG, **change}
    config = transformers.Qwen2_5_VLConfig(image_token_id=IMAGE, **kwargs)
    with pytest.raises(UnsupportedModelError, match=field):
        from_hf_config(config)


def test_row_layout_refuses_videos_and_overflow(documents):
    spec = from_hf_config(hf_vl_config()).vision
    video = dict(documents[0], video_grid_thw=np.ones((1, 3), np.int64))
    with pytest.raises(ImageLayoutError, match="video_grid_thw"):
        row_images([video], RowBudget(SEQ_LEN, MAX_PATCHES, MAX_IMAGES), spec)
    with pytest.raises(ImageLayoutError, match="patches"):
        row_images(documents, RowBudget(SEQ_LEN * 2, 100, MAX_IMAGES), spec)
    cut = dict(documents[0], input_ids=documents[0]["input_ids"][:10])
    no_image = dict(documents[0], input_ids=np.arange(3, 13))
    for document in (cut, no_image):
        with pytest.raises(ImageLayoutError, match="image tokens"):
            row_images([document], RowBudget(SEQ_LEN, MAX_PATCHES, MAX_IMAGES), spec)


def test_mrope_worked_example():
    """The module docstring's example: text a b, 2 x 2 merged image tokens, text c."""
    spec = from_hf_config(hf_vl_config()).vision
    ids = np.array([5, 6, IMAGE, IMAGE, IMAGE, IMAGE, 7])
    expected = [[0, 1, 2, 2, 2, 2, 4], [0, 1, 2, 2, 3, 3, 4], [0, 1, 2, 3, 2, 3, 4]]
    np.testing.assert_array_equal(mrope_positions(ids, np.array([[1, 4, 4]]), spec), expected)


def test_lora_on_the_language_model_equals_peft_and_the_merged_export(
    checkpoint, documents, tmp_path
):
    """LoRA on the language model's q/k/v/o_proj (PEFT's names; the vision blocks have qkv and
    proj): the PEFT adapter loaded by peft on transformers' model, and our merged export
    loaded by transformers, both give our logits on image inputs."""
    path, _ = checkpoint
    mesh = sharding.single_device_mesh()
    model = from_pretrained(path, mesh=mesh)
    spec = LoRASpec(rank=4, alpha=8.0, targets=("q_proj", "k_proj", "v_proj", "o_proj"))
    apply_lora(model, spec, mesh)
    keys = iter(jax.random.split(jax.random.key(1), 64))
    for _, _, linear in decoder_linears(model):
        if linear.lora_b is not None:
            linear.lora_b[...] = 0.3 * jax.random.normal(next(keys), linear.lora_b[...].shape)
    docs = documents[:2]
    actual = _our_logits(model, _rows(model.config.vision, [[d] for d in docs]))
    save_adapter(model, tmp_path / "adapter", spec, base_model=str(path))
    base = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(path)
    peft_model = peft.PeftModel.from_pretrained(base.eval().float(), tmp_path / "adapter").eval()
    save_pretrained(fold_adapters(model), tmp_path / "merged")
    merged = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "merged")
    for expected in (_hf_logits(peft_model, docs), _hf_logits(merged.eval().float(), docs)):
        for row, d in enumerate(docs):
            n = len(d["input_ids"])
            assert _max_rel(actual[row, :n], expected[row, :n]) < 1e-4


def test_context_split_with_images_is_refused(model, documents):
    batch = _rows(model.config.vision, [[documents[0]]] * 2)
    mesh = sharding.make_mesh(fsdp=1, context=2, devices=jax.devices()[:2])
    with jax.set_mesh(mesh), pytest.raises(UnsupportedModelError, match=r"mesh\.context"):
        _our_logits(model, batch)
