"""Generation with images (Gemma 3, Qwen2.5-VL): greedy replies to a left-padded batch of prompts
with different image counts (Qwen: different image sizes) and a text-only prompt equal
transformers' `generate` token for token, and the prefill's last logits equal the full forward's
(tiny random float32 models, real image processors)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from test_gemma3_vision import randomized, tiny_config, tiny_processor
from test_qwen2_5_vl import IMAGE, SIZES, _randomized, hf_vl_config

from sft_jax.generation.prompt_images import image_fields
from sft_jax.generation.sampler import generate, left_pad
from sft_jax.models import from_pretrained
from sft_jax.models.image_rows import ImageBudget, layout_of
from sft_jax.models.kv_cache import KVCache

NEW_TOKENS = 8


def transformers_greedy(model, inputs: dict[str, np.ndarray]) -> list[list[int]]:
    """transformers' greedy new tokens of a left-padded batch (no stop token)."""
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    tensors = {k: torch.as_tensor(v) for k, v in inputs.items()}
    with torch.no_grad():
        out = model.generate(**tensors, do_sample=False, max_new_tokens=NEW_TOKENS)
    return out[:, inputs["input_ids"].shape[1] :].tolist()


@nnx.jit
def _prefill_logits(model, ids, positions, images):
    cache = KVCache.empty(model.config, ids.shape[0], ids.shape[1], model.dtype)
    hidden, _ = model.extend(ids, positions, cache, images)
    return model.logits(hidden[:, -1])


@nnx.jit
def _forward_logits(model, ids, positions, images):
    segments = (positions >= 0).astype(jnp.int32)
    return model.logits(model.hidden_states(ids, positions, segments, images=images))


def check_prefill(model, prompts, images) -> float:
    """Max |diff| / max |logit| of the prefill's last logits (left-padded batch) against the
    full forward's logits at each prompt's last token (the prompts right-padded in one batch,
    each row laid out by the family's row function); asserted below 1e-4."""
    length = max(map(len, prompts)) + 3
    ids, positions = left_pad(prompts, len(prompts), length, 0)
    fields = image_fields(model.config, prompts, images, len(prompts), length)
    batch = np.asarray(_prefill_logits(model, ids, positions, fields))
    layout = layout_of(model.config, ImageBudget(length, 4, 512))
    rows = [
        layout.row([{"input_ids": np.asarray(p), **i}])
        for p, i in zip(prompts, images, strict=True)
    ]
    alone = {name: np.stack([row[name] for row in rows]) for name in layout.fields}
    ids, positions = np.zeros((len(prompts), length), np.int32), np.full(ids.shape, -1, np.int32)
    for row, prompt in enumerate(prompts):
        ids[row, : len(prompt)], positions[row, : len(prompt)] = prompt, np.arange(len(prompt))
    logits = np.asarray(_forward_logits(model, ids, positions, alone))
    expected = np.stack([logits[row, len(prompt) - 1] for row, prompt in enumerate(prompts)])
    worst = float((np.abs(batch - expected).max(axis=1) / np.abs(expected).max(axis=1)).max())
    print(f"prefill max rel diff {worst:.2e}")
    assert worst < 1e-4, worst
    return worst


def unpadded(inputs: dict[str, np.ndarray]) -> list[list[int]]:
    return [
        ids[mask > 0].tolist()
        for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"], strict=True)
    ]


# --- Gemma 3 -------------------------------------------------------------------------------

BOI = "<start_of_image>"
GEMMA_TEXTS = (
    f"describe {BOI} what is this",
    f"a cat {BOI} and {BOI} two images what is",
    "what is this a cat on the mat",
)


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    processor = tiny_processor()
    processor.tokenizer.padding_side = "left"
    reference = randomized(tiny_config(processor.tokenizer))
    path = tmp_path_factory.mktemp("gemma3_generate")
    reference.save_pretrained(path)
    rng = np.random.RandomState(1)
    pictures = [
        [rng.randint(0, 255, (40, 30, 3)).astype(np.uint8) for _ in range(n)] for n in (1, 2, 0)
    ]
    out = processor(text=list(GEMMA_TEXTS), images=pictures, padding=True, return_tensors="np")
    inputs = {k: np.asarray(v) for k, v in out.items()}
    per_prompt, start = [], 0
    for count in (1, 2, 0):
        per_prompt.append(
            {"pixel_values": inputs["pixel_values"][start : start + count]} if count else {}
        )
        start += count
    return reference, from_pretrained(path), inputs, per_prompt


def test_gemma3_greedy_equals_transformers(gemma):
    reference, model, inputs, images = gemma
    prompts = unpadded(inputs)
    ours = generate(model, prompts, images=images, max_new_tokens=NEW_TOKENS, stop_token_ids=[])
    assert ours == transformers_greedy(reference, inputs)


def test_gemma3_prefill_equals_forward(gemma):
    _, model, inputs, images = gemma
    check_prefill(model, unpadded(inputs), images)


# --- Qwen2.5-VL ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    import transformers

    torch.manual_seed(0)
    reference = _randomized(transformers.Qwen2_5_VLForConditionalGeneration(hf_vl_config()))
    path = tmp_path_factory.mktemp("qwen_generate")
    reference.save_pretrained(path)
    processor = transformers.Qwen2VLImageProcessorPil(
        patch_size=4, temporal_patch_size=2, merge_size=2, min_pixels=64, max_pixels=64 * 64
    )
    rng = np.random.default_rng(1)
    pictures = [(rng.random((*size, 3)) * 255).astype(np.uint8) for size in SIZES]
    prompts, images = [], []
    for text_runs, image_list in (([4, 3], pictures[:1]), ([3, 2, 5], pictures[1:]), ([6], [])):
        processed = processor(images=image_list, return_tensors="np") if image_list else {}
        grids = processed.get("image_grid_thw", np.zeros((0, 3), np.int64))
        ids = list(rng.integers(3, 100, text_runs[0]))
        for grid, run in zip(grids, text_runs[1:], strict=True):
            ids += [122, *[IMAGE] * (int(np.prod(grid)) // 4), 123, *rng.integers(3, 100, run)]
        prompts.append([int(t) for t in ids])
        images.append({k: np.asarray(v) for k, v in processed.items()})
    return reference, from_pretrained(path), prompts, images


def test_qwen2_5_vl_greedy_equals_transformers(qwen):
    reference, model, prompts, images = qwen
    length = max(map(len, prompts))
    ids = np.zeros((len(prompts), length), np.int64)
    mask = np.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, length - len(prompt) :], mask[row, length - len(prompt) :] = prompt, 1
    with_images = [i for i in images if i]
    inputs = {
        "input_ids": ids,
        "attention_mask": mask,
        "mm_token_type_ids": (ids == IMAGE).astype(np.int64),
        "pixel_values": np.concatenate([i["pixel_values"] for i in with_images]),
        "image_grid_thw": np.concatenate([i["image_grid_thw"] for i in with_images]),
    }
    ours = generate(model, prompts, images=images, max_new_tokens=NEW_TOKENS, stop_token_ids=[])
    assert ours == transformers_greedy(reference, inputs)


def test_qwen2_5_vl_prefill_equals_forward(qwen):
    _, model, prompts, images = qwen
    check_prefill(model, prompts, images)


def test_images_for_a_text_model_are_refused(qwen):
    _, model, prompts, images = qwen
    text_config = type(model.config)(**{**model.config.__dict__, "vision": None})
    with pytest.raises(ValueError, match="text model"):
        image_fields(text_config, prompts, images, 4, 64)
