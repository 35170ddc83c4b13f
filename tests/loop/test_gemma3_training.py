"""Training Gemma 3 on images (issue 35): a tiny random Gemma3ForConditionalGeneration with its
processor's parts in one folder (a word-level tokenizer with Gemma 3's special tokens,
Gemma3ImageProcessor at 28 x 28, the real chat template), conversations with images made by PIL,
through the trainer. The eval loss at step 0 against transformers on the processor's own output
of each conversation (labels -100 but the model's replies and their <end_of_turn>), padded and
packed, on 8 devices and on one; a run resumed on 8 devices logs the loss of one device's run
straight through."""

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
from chat_tokenizers import TEMPLATE_DIR, pieces, word_level
from test_gemma3_vision import randomized, tiny_config
from test_trainer import base_config

from sft_jax.core.spec import RunSpec
from sft_jax.data import vision
from sft_jax.loop import trainer
from sft_jax.train import sharding
from sft_jax.train.setup import build_model, open_run_data
from sft_jax.workdir.rundir import checkpoints_path

IMAGE, BOI, EOI = "<image_soft_token>", "<start_of_image>", "<end_of_image>"
SPECIALS = ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>", BOI, IMAGE, EOI]
REPLIES = ["A red square .", "It is 42 !", "Draw this", "What is 42 ?"]
WORDS = "user model What is this ? And A red square . It is 42 ! Draw"
SIZES = [(16, 16), (16, 24), (24, 24), (24, 16)]  # (height, width), each resized to 28 x 28


def _processor() -> transformers.Gemma3Processor:
    backend = word_level([*pieces(WORDS), " ", "\n", "\n\n"], SPECIALS)
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        unk_token="<unk>", extra_special_tokens={
            "boi_token": BOI, "image_token": IMAGE, "eoi_token": EOI},
    )  # fmt: skip
    images = transformers.Gemma3ImageProcessorPil(size={"height": 28, "width": 28})
    template = (TEMPLATE_DIR / "google-gemma-3-it.jinja").read_text(encoding="utf-8")
    return transformers.Gemma3Processor(
        image_processor=images, tokenizer=tokenizer, image_seq_length=4, chat_template=template
    )


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
    """The checkpoint with its processor, the images, train.jsonl and eval.jsonl."""
    path = tmp_path_factory.mktemp("gemma3_sft")
    processor = _processor()
    processor.save_pretrained(path)
    config = tiny_config(processor.tokenizer, {"vocab_size": len(processor.tokenizer)})
    randomized(config).save_pretrained(path)
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
    config.data.max_length = 64
    config.data.max_images_per_row = 3
    config.data.cache_dir = str(folder / "cache")
    config.train.global_batch_size = 4
    config.eval.global_batch_size = 4
    config.train.loss_chunk_size = 32
    for key, value in data.items():
        config.data[key] = value
    return RunSpec.of(config)


def _reply_labels(ids: np.ndarray, tokenizer) -> np.ndarray:
    """-100 but each model reply and its <end_of_turn>, found in the processor's tokens."""
    start, end = (tokenizer.convert_tokens_to_ids(t) for t in ("<start_of_turn>", "<end_of_turn>"))
    model = tokenizer.convert_tokens_to_ids("model")
    labels = np.full_like(ids, -100)
    for index in np.flatnonzero(ids[:-2] == start):
        if ids[index + 1] == model:
            stop = index + 3 + int(np.argmax(ids[index + 3 :] == end))
            labels[index + 3 : stop + 1] = ids[index + 3 : stop + 1]  # after "model\n"
    return labels


def _with_images(example: dict, folder: Path) -> list[dict]:
    """The example's messages, each image part holding its PIL image."""
    images = iter(PIL.Image.open(folder / name) for name in example["images"])
    messages = []
    for message in example["messages"]:
        content = message["content"]
        if isinstance(content, list):
            content = [{**p, "image": next(images)} if p["type"] == "image" else p for p in content]
        messages.append({**message, "content": content})
    return messages


def _reference_loss(folder: Path) -> float:
    """transformers' token-weighted cross-entropy over the eval conversations, each the
    processor's own output (its chat template, its image preprocessing)."""
    processor = vision.load_processor(folder)
    model = transformers.Gemma3ForConditionalGeneration.from_pretrained(folder).eval()
    nll, count = 0.0, 0
    for line in (folder / "eval.jsonl").read_text().splitlines():
        inputs = processor.apply_chat_template(
            _with_images(json.loads(line), folder),
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
        )
        ids = inputs["input_ids"][0].numpy()
        labels = _reply_labels(ids, processor.tokenizer)
        with torch.no_grad():  # token_type_ids: each image's tokens attend bidirectionally
            logits = model(**inputs).logits[0].double()
        log_probs = torch.log_softmax(logits, -1).numpy()
        targets, mask = labels[1:], labels[1:] != -100
        nll -= log_probs[:-1][np.arange(len(targets)), np.where(mask, targets, 0)][mask].sum()
        count += int(mask.sum())
    return nll / count


def _trainer(spec: RunSpec, workdir: Path, mesh) -> trainer.Trainer:
    model, _, trainable = build_model(spec, mesh)
    return trainer.Trainer(spec, workdir, model, open_run_data(spec), trainable, mesh=mesh)


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


def test_padded_rows_on_8_devices_match_transformers(folder, reference_loss, tmp_path):
    """One conversation a row on 8 devices (fsdp 4 x tensor 2), 2 micro-batches: the eval loss
    at step 0 equals transformers'; a train step runs."""
    config = _config(folder, steps=1, accumulation=2, packing=False)
    run, losses = _train(config, tmp_path, sharding.make_mesh(1, 4, 2))
    assert run.initial_eval["eval/loss"] == pytest.approx(reference_loss, rel=1e-4)
    assert [step for step, _ in losses] == [1] and np.isfinite(losses[0][1])


@pytest.mark.e2e
def test_packed_training_learns_and_resumes_exactly(folder, reference_loss, tmp_path):
    """Packed rows on one device: the eval loss at step 0 equals transformers'; 3 steps, saved
    at step 2 and at the end; the same WORKDIR without its last checkpoint resumes at step 2 on
    8 devices and logs the same step-3 loss."""
    config = _config(folder, save_every=2)
    one = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    run, straight = _train(config, tmp_path / "straight", one)
    assert run.initial_eval["eval/loss"] == pytest.approx(reference_loss, rel=1e-4)
    assert [step for step, _ in straight] == [1, 2, 3]
    assert straight[-1][1] < straight[0][1]
    trained = jax.tree_util.tree_leaves_with_path(run.state["params"])
    assert trained and not any("vision" in jax.tree_util.keystr(p) for p, _ in trained)
    shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
    shutil.rmtree(checkpoints_path(tmp_path / "resumed") / "3")
    (tmp_path / "resumed" / "metrics.jsonl").unlink()
    _, resumed = _train(config, tmp_path / "resumed", sharding.make_mesh(1, 4, 2))
    assert [step for step, _ in resumed] == [3]
    assert resumed[0][1] == pytest.approx(straight[2][1], rel=1e-5)
