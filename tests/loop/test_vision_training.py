"""Training on images (issue 35): a tiny random Qwen2.5-VL checkpoint with its processor's parts
in one folder (tokenizer, Qwen2VLImageProcessor, the real chat template), conversations with
images made by PIL, through the trainer. The eval loss at step 0 against transformers'
Qwen2_5_VLForConditionalGeneration on the processor's own output of each conversation (labels
-100 but the assistant replies); packed equals padded; sharded equals one device; the vision
tower frozen by default; a resumed run equals one run straight through."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import PIL.Image
import pytest
import torch
import transformers
from chat_tokenizers import TEMPLATE_DIR, WORDS, pieces, word_level
from flax import nnx
from test_trainer import base_config

from sft_jax.core.errors import ConfigError
from sft_jax.core.spec import RunSpec
from sft_jax.data import vision
from sft_jax.loop import trainer
from sft_jax.models import from_hf_config
from sft_jax.train import sharding, vision_flops
from sft_jax.train.flops import training_flops_per_token
from sft_jax.train.setup import build_model, image_options, open_run_data
from sft_jax.workdir.rundir import checkpoints_path

MARKERS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *MARKERS]
REPLIES = ["A red square .", "It is 42 !", "Draw this", "What is 42 ?"]
SIZES = [(16, 16), (16, 24), (24, 24), (24, 16)]  # (height, width): 4, 6, 9, 6 image tokens
VISION = {
    "depth": 2,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_heads": 2,
    "patch_size": 4,
    "temporal_patch_size": 2,
    "spatial_merge_size": 2,
    "window_size": 16,
    "out_hidden_size": 64,
    "fullatt_block_indexes": [1],
}


def _tokenizer() -> transformers.PreTrainedTokenizerFast:
    corpus = pieces(WORDS + " What is this ? And A red square . It is 42 ! Draw")
    backend = word_level([*corpus, " ", "\n", "\n\n"], SPECIALS)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", eos_token="<|im_end|>"
    )


def _hf_model(tokenizer) -> transformers.Qwen2_5_VLForConditionalGeneration:
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in MARKERS}
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e4},
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = transformers.Qwen2_5_VLConfig(
        text_config=text,
        vision_config=dict(VISION),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(0)
    model = transformers.Qwen2_5_VLForConditionalGeneration(config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # weights large enough to show in the loss; norms near one
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * 0.1
            param.copy_(noise + (1.0 if "norm" in name or "ln_q" in name else 0.0))
    return model.eval().float()


def _example(index: int) -> dict:
    """Image index % 4 and a question; every third example a second turn with the next image."""
    messages = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": "What is this ?"}],
        },
        {"role": "assistant", "content": [{"type": "text", "text": REPLIES[index % 4]}]},
    ]
    images = [f"img{index % 4}.png"]
    if index % 3 == 0:
        messages += [
            {"role": "user", "content": [{"type": "text", "text": "And"}, {"type": "image"}]},
            {"role": "assistant", "content": REPLIES[(index + 1) % 4]},
        ]
        images.append(f"img{(index + 1) % 4}.png")
    return {"messages": messages, "images": images}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """The checkpoint with its processor's parts, the images, train.jsonl and eval.jsonl."""
    path = tmp_path_factory.mktemp("qwen2_5_vl_sft")
    tokenizer = _tokenizer()
    tokenizer.save_pretrained(path)
    images = transformers.Qwen2VLImageProcessor(
        min_pixels=8 * 8, max_pixels=24 * 24, patch_size=4, merge_size=2, temporal_patch_size=2
    )
    images.save_pretrained(path)
    saved = json.loads((path / "preprocessor_config.json").read_text())
    saved["processor_class"] = "Qwen2_5_VLProcessor"  # as the hub's file says
    (path / "preprocessor_config.json").write_text(json.dumps(saved))
    template = TEMPLATE_DIR / "Qwen-Qwen2.5-VL-7B-Instruct.jinja"
    (path / "chat_template.jinja").write_text(template.read_text(encoding="utf-8"))
    _hf_model(tokenizer).save_pretrained(path)
    rng = np.random.default_rng(0)
    for index, (height, width) in enumerate(SIZES):
        pixels = rng.integers(0, 256, (height, width, 3), np.uint8)
        PIL.Image.fromarray(pixels).save(path / f"img{index}.png")
    for name, examples in (("train", range(8)), ("eval", range(8, 13))):
        lines = [json.dumps(_example(i)) + "\n" for i in examples]
        (path / f"{name}.jsonl").write_text("".join(lines))
    return path


def _config(folder: Path, save_every=0, steps=3, accumulation=1, **data):
    config = base_config(folder, steps=steps, learning_rate=3e-3)
    config.train.gradient_accumulation_steps = accumulation
    config.checkpoint.enabled, config.checkpoint.every_steps = bool(save_every), save_every
    config.data.train_files = str(folder / "train.jsonl")
    config.data.eval_files = str(folder / "eval.jsonl")
    config.data.format = "messages"
    config.data.max_length = 96
    config.data.max_images_per_row = 3
    config.data.max_image_patches_per_row = 64
    config.data.cache_dir = str(folder / "cache")
    config.train.global_batch_size = 4
    config.eval.global_batch_size = 4
    config.train.loss_chunk_size = 32
    for key, value in data.items():
        config.data[key] = value
    return RunSpec.of(config)


def _trainer(spec: RunSpec, workdir: Path, mesh) -> trainer.Trainer:
    model, _, trainable = build_model(spec, mesh)
    return trainer.Trainer(spec, workdir, model, open_run_data(spec), trainable, mesh=mesh)


def _reply_labels(ids: np.ndarray, tokenizer) -> np.ndarray:
    """-100 but each assistant reply and its <|im_end|>, found in the processor's tokens."""
    start, end = (tokenizer.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>"))
    assistant = tokenizer.convert_tokens_to_ids("assistant")
    labels = np.full_like(ids, -100)
    for index in np.flatnonzero(ids[:-2] == start):
        if ids[index + 1] == assistant:
            stop = index + 3 + int(np.argmax(ids[index + 3 :] == end))
            labels[index + 3 : stop + 1] = ids[index + 3 : stop + 1]  # after "assistant\n"
    return labels


def _reference_loss(folder: Path) -> float:
    """transformers' token-weighted cross-entropy over the eval conversations, each the
    processor's own output (its chat template, its image preprocessing)."""
    processor = vision.load_processor(folder)
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(folder).eval()
    nll, count = 0.0, 0
    for line in (folder / "eval.jsonl").read_text().splitlines():
        example = json.loads(line)
        images = iter(PIL.Image.open(folder / name) for name in example["images"])
        messages = [
            {**m, "content": [{**p, "image": next(images)} if p["type"] == "image" else p
                              for p in m["content"]]} if isinstance(m["content"], list) else m
            for m in example["messages"]
        ]  # fmt: skip
        inputs = processor.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_tensors="pt"
        )
        ids = inputs["input_ids"][0].numpy()
        labels = _reply_labels(ids, processor.tokenizer)
        with torch.no_grad():  # every output of the processor (mm_token_type_ids: M-RoPE)
            logits = model(**inputs).logits[0].double()
        log_probs = torch.log_softmax(logits, -1).numpy()
        targets, mask = labels[1:], labels[1:] != -100
        nll -= log_probs[:-1][np.arange(len(targets)), np.where(mask, targets, 0)][mask].sum()
        count += int(mask.sum())
    return nll / count


def _train(spec: RunSpec, workdir: Path, mesh) -> tuple[trainer.Trainer, list]:
    run = _trainer(spec, workdir, mesh)
    run.resume()
    run.train()
    run.close()
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    losses = [(r["step"], r["train/loss"]) for r in map(json.loads, lines) if "train/loss" in r]
    return run, losses


@pytest.fixture(scope="module")
def reference_loss(folder) -> float:
    return _reference_loss(folder)


def test_padded_rows_on_4_devices_match_transformers(folder, reference_loss, tmp_path):
    """The eval loss at step 0, one conversation a row, on 4 devices (fsdp 2 x tensor 2); the
    train step with 2 micro-batches (the image arrays split with their rows) runs."""
    config = _config(folder, steps=1, accumulation=2, packing=False)
    run, losses = _train(config, tmp_path, sharding.make_mesh(1, 2, 2, devices=jax.devices()[:4]))
    assert run.initial_eval["eval/loss"] == pytest.approx(reference_loss, rel=1e-4)
    assert [step for step, _ in losses] == [1] and np.isfinite(losses[0][1])
    # MFU's FLOPs: the decoder's and the frozen ViT's forward on each row's 64-patch budget.
    model_config = from_hf_config(transformers.AutoConfig.from_pretrained(folder))
    seq_len = run.data.seq_len
    vision = vision_flops.qwen_row_flops(model_config.vision, 64) / seq_len
    expected = training_flops_per_token(model_config, seq_len) + vision
    assert vision > 0 and run.flops_per_token == pytest.approx(expected, rel=1e-12)


def test_train_vision_trains_the_tower_too(folder):
    """Frozen by default (full fine-tuning trains the decoder only); model.train_vision=True
    trains it too; with adapters, refused by name."""
    one = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    for train_vision in (False, True):
        config = base_config(folder)
        config.model.train_vision = train_vision
        model, _, trainable = build_model(RunSpec.of(config), one)
        trained = nnx.to_flat_state(nnx.state(model, trainable))
        vision = [path for path, _ in trained if "vision" in path]
        assert bool(vision) == train_vision and len(trained) > len(vision)
    config.lora.rank = 4
    with pytest.raises(ConfigError, match=r"config.model.train_vision=True with adapters"):
        build_model(RunSpec.of(config), one)
    # Adapters on the frozen tower (lora.vision_targets): those train, its weights do not.
    config.model.train_vision, config.lora.dropout = False, 0.0
    config.lora.vision_targets = "qkv,mlp.0"
    model, _, trainable = build_model(RunSpec.of(config), one)
    trained = [p for p, _ in nnx.to_flat_state(nnx.state(model, trainable)) if "vision" in p]
    assert {p[-1] for p in trained} == {"lora_a", "lora_b"}
    assert {p[-2] for p in trained} == {"qkv", "fc1"}  # the merger's mlp.0 is its fc1
    # What the planner compiles: the image fields at config.data's budget (64 patches of
    # 2 x 4 x 4 x 3 values, 3 images a row), as the run's data gives them.
    images = dict(image_options(_config(folder), model.config)["images"])
    assert images["vision_patches"] == (64, 96) and images["vision_grids"] == (3, 3)


@pytest.mark.e2e
def test_training_learns_freezes_the_vision_tower_and_resumes_exactly(
    folder, reference_loss, tmp_path
):
    """Packed rows on one device: the eval loss at step 0 equals transformers'; 3 steps, saved
    at step 2 and at the end; the same WORKDIR without its last checkpoint resumes at step 2 on
    8 devices and logs the same step-3 loss; on the same device, bitwise."""
    config = _config(folder, save_every=2)
    one = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    run, straight = _train(config, tmp_path / "straight", one)
    assert run.initial_eval["eval/loss"] == pytest.approx(reference_loss, rel=1e-4)
    assert [step for step, _ in straight] == [1, 2, 3]
    assert straight[-1][1] < straight[0][1]  # it learns on the same 4 rows of 2 batches
    # The vision tower is frozen (config.model.train_vision=False): not among the trained
    # parameters, the frozen values still the checkpoint's.
    trained = jax.tree_util.tree_leaves_with_path(run.state["params"])
    assert trained and not any("vision" in jax.tree_util.keystr(p) for p, _ in trained)
    shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
    shutil.rmtree(checkpoints_path(tmp_path / "resumed") / "3")
    metrics = tmp_path / "resumed" / "metrics.jsonl"
    metrics.unlink()
    # Resumed on 8 devices (fsdp 4 x tensor 2): the same step-3 loss as one device's.
    _, resumed = _train(config, tmp_path / "resumed", sharding.make_mesh(1, 4, 2))
    assert [step for step, _ in resumed] == [3]
    assert resumed[0][1] == pytest.approx(straight[2][1], rel=1e-5)
    # Resumed on the same device: bitwise, the step-3 loss and every trained parameter.
    shutil.copytree(tmp_path / "straight", tmp_path / "same")
    shutil.rmtree(checkpoints_path(tmp_path / "same") / "3")
    (tmp_path / "same" / "metrics.jsonl").unlink()
    again, same = _train(config, tmp_path / "same", one)
    assert same == [(3, straight[2][1])]
    for (path, a), (_, b) in zip(
        trained, jax.tree_util.tree_leaves_with_path(again.state["params"]), strict=True
    ):
        np.testing.assert_array_equal(
            np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path)
        )
