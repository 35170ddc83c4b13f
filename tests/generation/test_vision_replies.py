"""The user ends of generation with images, on a tiny Gemma 3 export (its processor saved beside
it): eval samples of an image dataset are generated with their images and name them, and
`chat --image=PATH` replies as transformers' greedy generate does on the same input."""

from __future__ import annotations

import base64
import functools
import json

import jax
import numpy as np
import PIL.Image
import pytest
import torch
import transformers
from chat_tokenizers import TEMPLATE_DIR, WORDS, pieces, word_level
from test_gemma3_vision import randomized, tiny_config
from test_generate import chat_model_dir, checkpoints, run_chat  # noqa: F401 (fixtures)
from test_trainer import base_config

from sft_jax.core.spec import RunSpec
from sft_jax.data import vision
from sft_jax.data.vision_source import open_vision_data
from sft_jax.generation.sampler import chat_stop_token_ids
from sft_jax.generation.samples import generation_metrics, sample_rows
from sft_jax.loop import trainer
from sft_jax.models import from_pretrained
from sft_jax.train import sharding
from sft_jax.train.setup import build_model, open_run_data

MARKERS = ["<start_of_image>", "<end_of_image>", "<image_soft_token>"]
NAMES = ("boi_token", "eoi_token", "image_token")
QUESTION = "What is this ?"
NEW_TOKENS = 6


def _user(*parts: dict) -> dict:
    return {"role": "user", "content": [*parts, {"type": "text", "text": QUESTION}]}


def _reply(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def _data_uri(path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A Gemma 3 export: random weights, the processor's parts, two images and eval.jsonl (one
    image by path, two by path, one as a data: URI, text only)."""
    path = tmp_path_factory.mktemp("gemma3_export")
    corpus = pieces(WORDS + " What is this ? And A red square . It is 42 ! Draw")
    specials = ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>", *MARKERS]
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=word_level([*corpus, " ", "\n", "\n\n", "\n\n\n"], specials),
        pad_token="<pad>", unk_token="<unk>", bos_token="<bos>", eos_token="<eos>",
        extra_special_tokens=dict(zip(NAMES, MARKERS, strict=True)),
    )  # fmt: skip
    template = (TEMPLATE_DIR / "google-gemma-3-it.jinja").read_text(encoding="utf-8")
    images = transformers.Gemma3ImageProcessor(size={"height": 28, "width": 28})
    processor = transformers.Gemma3Processor(images, tokenizer, template, image_seq_length=4)
    processor.save_pretrained(path)
    ids = {f"{k}_token_id": getattr(tokenizer, f"{k}_token_id") for k in ("bos", "eos", "pad")}
    randomized(tiny_config(tokenizer, {"vocab_size": len(tokenizer), **ids})).save_pretrained(path)
    rng = np.random.default_rng(0)
    for index in range(2):
        pixels = rng.integers(0, 256, (30 + 8 * index, 40, 3), np.uint8)
        PIL.Image.fromarray(pixels).save(path / f"img{index}.png")
    image = {"type": "image"}
    uri = {"type": "image_url", "image_url": {"url": _data_uri(path / "img1.png")}}
    examples = [
        {"messages": [_user(image), _reply("A red square .")], "images": ["img0.png"]},
        {"messages": [_user(image, image), _reply("It is 42 !")],
         "images": ["img1.png", "img0.png"]},
        {"messages": [_user(uri), _reply("A red square .")]},
        {"messages": [_user(), _reply("It is 42 !")]},
    ]  # fmt: skip
    lines = "".join(json.dumps(e) + "\n" for e in examples)
    for name in ("train", "eval"):
        (path / f"{name}.jsonl").write_text(lines)
    return path


@functools.lru_cache(maxsize=1)
def _transformers_model(model_dir: str) -> transformers.Gemma3ForConditionalGeneration:
    return transformers.Gemma3ForConditionalGeneration.from_pretrained(model_dir).eval()


def transformers_reply(model_dir, inputs: dict, stops: list[int]) -> str:
    """transformers' greedy reply (its stop token and special tokens left out)."""
    model = _transformers_model(str(model_dir))
    tensors = {k: torch.as_tensor(np.array(v)) for k, v in inputs.items()}
    with torch.no_grad():
        out = model.generate(
            **tensors, do_sample=False, max_new_tokens=NEW_TOKENS, eos_token_id=stops
        )
    new = [t for t in out[0, tensors["input_ids"].shape[1] :].tolist() if t not in stops]
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    return tokenizer.decode(new, skip_special_tokens=True).strip()


def _spec(export) -> RunSpec:
    config = base_config(export)
    config.data.train_files = str(export / "train.jsonl")
    config.data.eval_files = str(export / "eval.jsonl")
    config.data.format = "messages"
    config.data.max_length = 64
    config.data.max_images_per_row = 2
    config.data.cache_dir = str(export / "cache")
    config.train.global_batch_size = config.eval.global_batch_size = 4
    config.eval.generate_examples = config.eval.show_samples = 4
    config.eval.max_new_tokens = NEW_TOKENS
    return RunSpec.of(config)


def check_samples(export, source, text: str) -> None:
    """Each sample's reply is transformers' on its prompt and images, which it names."""
    rows = sample_rows(text)
    image_id = source.tokenizer.convert_tokens_to_ids("<image_soft_token>")
    stops = chat_stop_token_ids(source.tokenizer, export)
    for row, (prompt, _), (arrays, names) in zip(
        rows, source.eval_prompts, source.eval_images, strict=True
    ):
        inputs = {"input_ids": prompt[None], "attention_mask": np.ones_like(prompt[None])}
        inputs["token_type_ids"] = (prompt[None] == image_id).astype(np.int64)
        inputs.update({name: array for name, array in arrays.items() if len(array)})
        assert row[3] == transformers_reply(export, inputs, stops)
        if names:
            assert row[2].startswith(f"[images: {', '.join(names)}]\n")
            assert row[2].count("<image_soft_token>") == len(names)  # each run shown once


def test_eval_samples_are_generated_with_their_images_and_name_them(export):
    source = open_vision_data(_spec(export))
    labels = [names for _, names in source.eval_images]
    assert labels == [("img0.png",), ("img1.png", "img0.png"), ("image 1 of eval.jsonl:3",), ()]
    metrics = generation_metrics(
        from_pretrained(export),
        source.tokenizer,
        source.eval_prompts,
        stop_token_ids=chat_stop_token_ids(source.tokenizer, export),
        max_new_tokens=NEW_TOKENS,
        show=4,
        images=source.eval_images,
    )
    check_samples(export, source, metrics["eval/samples"])


def test_the_trainers_eval_generates_with_the_images_on_two_devices(export, tmp_path):
    spec = _spec(export)
    mesh = sharding.make_mesh(1, 2, 1, devices=jax.devices()[:2])
    model, _, trainable = build_model(spec, mesh)
    source = open_run_data(spec)
    run = trainer.Trainer(spec, tmp_path / "run", model, source, trainable, mesh=mesh)
    metrics = run.run_eval(0)
    assert metrics["eval/generated"] == 4
    check_samples(export, source, metrics["eval/samples"])


def test_chat_image_replies_as_transformers(export, run_chat):  # noqa: F811
    out = run_chat(
        f"--model={export}", f"--image={export / 'img0.png'}", f"--prompt={QUESTION}",
        f"--max_new_tokens={NEW_TOKENS}",
    )  # fmt: skip
    processor = vision.load_processor(export)
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}
    ]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    image = PIL.Image.open(export / "img0.png").convert("RGB")
    inputs = dict(processor(text=[text], images=[[image]], add_special_tokens=False))
    stops = chat_stop_token_ids(processor.tokenizer, export)
    assert out == transformers_reply(export, inputs, stops) + "\n"


def test_chat_image_on_a_text_model_is_one_clear_message(chat_model_dir, run_chat, export):  # noqa: F811
    with pytest.raises(SystemExit, match="holds a text model"):
        run_chat(f"--model={chat_model_dir}", f"--image={export / 'img0.png'}", "--prompt=t10")
    with pytest.raises(SystemExit, match="cannot be read as an image"):
        run_chat(f"--model={export}", f"--image={export / 'missing.png'}", "--prompt=hi")
