"""The edges of training on images (issue 35), on test_vision_training's tiny Qwen2.5-VL: what
combines with images is tested against transformers (a text dataset on the image-text model;
remat, the blockwise kernel and bfloat16 compute with images; inspect and its --check), what
does not is refused by name before any data loads or anything compiles (objectives other than
SFT, prompt methods, a sequence split over mesh.context, a text model, too many images a row)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest
import torch
import transformers
from test_gemma3_vision import tiny_config, tiny_processor
from test_trainer import base_config
from test_vision_training import REPLIES, _reply_labels, _train, folder, reference_loss

from configs import base
from sft_jax.cli import inspect
from sft_jax.core.errors import ConfigError, UsageError
from sft_jax.core.spec import RunSpec
from sft_jax.data import vision
from sft_jax.data.messages import BadExample, text_content
from sft_jax.data.records import DataError
from sft_jax.loop import trainer
from sft_jax.models import from_hf_config
from sft_jax.train import kernel_choice, sharding
from sft_jax.train.config_check import check_values
from sft_jax.train.setup import open_run_data

# The module's fixtures: the checkpoint with its processor's parts and images; transformers'
# eval loss on its eval conversations.
__all__ = ["folder", "reference_loss"]

QUESTION = [{"type": "image"}, {"type": "text", "text": "What is this ?"}]


def _write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.fixture(scope="module")
def files(folder) -> dict[str, str]:
    """TRL's vision formats beside the SFT data: preference pairs and prompts with an image,
    and text-only conversations."""
    pairs = [
        {
            "images": [f"img{i % 4}.png"],
            "prompt": [{"role": "user", "content": QUESTION}],
            "chosen": [{"role": "assistant", "content": REPLIES[i % 4]}],
            "rejected": [{"role": "assistant", "content": REPLIES[(i + 1) % 4]}],
        }
        for i in range(4)
    ]
    prompts = [{"prompt": [{"role": "user", "content": QUESTION}], "images": ["img0.png"]}]
    # An image given inline as an image_url part, with no `images` column.
    inline = {"type": "image_url", "image_url": {"url": "img1.png"}}
    prompts.append({"prompt": [{"role": "user", "content": [inline]}]})
    text = [
        {
            "messages": [
                {"role": "user", "content": "What is this ?"},
                {"role": "assistant", "content": REPLIES[i % 4]},
            ]
        }
        for i in range(6)
    ]
    return {
        "pairs": _write(folder / "pairs.jsonl", pairs),
        "prompts": _write(folder / "prompts.jsonl", prompts),
        "inline": _write(folder / "inline.jsonl", prompts[1:]),
        "text_train": _write(folder / "text_train.jsonl", text[:4]),
        "text_eval": _write(folder / "text_eval.jsonl", text[2:]),
    }


def _base(folder: Path) -> ml_collections.ConfigDict:
    """test_vision_training's run: its images, max_length 96, 3 steps of 4 rows."""
    config = base_config(folder, steps=3, learning_rate=3e-3)
    config.data.update(
        train_files=str(folder / "train.jsonl"), eval_files=str(folder / "eval.jsonl"),
        format="messages", max_length=96, max_images_per_row=3, max_image_patches_per_row=64,
        cache_dir=str(folder / "cache"),
    )  # fmt: skip
    config.train.global_batch_size = config.eval.global_batch_size = 4
    config.train.loss_chunk_size = 32
    return config


def _spec(folder: Path, **fields) -> RunSpec:
    """_base's run with `fields` ("section.field": value) changed."""
    config = _base(folder)
    for key, value in fields.items():
        section, field = key.split(".")
        config[section][field] = value
    return RunSpec.of(config)


@pytest.mark.parametrize("objective", ["dpo", "orpo", "simpo", "reward", "grpo", "ppo"])
def test_objectives_other_than_sft_refuse_images(folder, files, objective):
    """Pairs and prompts are tokenized as text: their images would be dropped (a GRPO prompt
    kept one unexpanded image token), so data with images is refused naming the objective."""
    data = files["prompts" if objective in ("grpo", "ppo") else "pairs"]
    # What each objective's own checks ask (no generated eval samples, whole groups).
    fields = {"eval.generate_examples": 0, "eval.show_samples": 0, "train.global_batch_size": 8}
    fields["train.objective"] = objective
    spec = _spec(folder, **fields, **{"data.train_files": data})
    message = rf"config.train.objective='{objective}' with images \(config.data.train_files: "
    with pytest.raises(ConfigError, match=message):
        check_values(spec, device_count=1, batch_shards=1)
    # An image_url part alone (no `images` column) is seen too.
    spec = _spec(folder, **fields, **{"data.train_files": files["inline"]})
    with pytest.raises(ConfigError, match=r"Only train.objective='sft' trains on images"):
        check_values(spec, device_count=1, batch_shards=1)
    if objective in ("grpo", "ppo"):
        return  # online RL reads no mixture (refused on its own)
    # A mixture's sources are read too, and named.
    mixture = [
        {"name": "text", "train_files": files["text_train"], "weight": 1.0},
        {"name": "images", "train_files": data, "weight": 1.0},
    ]
    blank = {"data.train_files": "", "data.eval_files": "", "data.mixture": mixture}
    spec = _spec(folder, **fields, **blank)
    message = rf"'{objective}' with images \(config.data.mixture\[images\].train_files: "
    with pytest.raises(ConfigError, match=message):
        check_values(spec, device_count=1, batch_shards=1)


def test_grpo_with_images_stops_before_any_data_or_model_loads(folder, files, tmp_path):
    """Through the trainer's entry point: the refusal comes from the config check, before the
    prompts are read (nothing is written to the WORKDIR)."""
    config = _base(folder)
    config.train.update(objective="grpo", global_batch_size=8)
    config.eval.global_batch_size = 8
    config.data.update(train_files=files["prompts"], eval_files="")
    config.eval.update(generate_examples=0, show_samples=0)
    with pytest.raises(ConfigError, match="rollouts are sampled from text prompts"):
        trainer.run(RunSpec.of(config), tmp_path / "run", data_factory=open_run_data)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning", "prefix_tuning"])
def test_prompt_methods_refuse_images(folder, method):
    spec = _spec(folder, **{"prompt.method": method, "prompt.num_virtual_tokens": 4})
    with pytest.raises(ConfigError, match=rf"config.prompt.method='{method}' with images"):
        check_values(spec, device_count=1, batch_shards=1)


@pytest.mark.parametrize("attention", ["blockwise", "splash", "cudnn"])
def test_gemma3_with_images_refuses_a_named_fused_kernel(attention):
    """Gemma 3's image tokens attend both ways within their image: only the einsum path masks
    that ('auto' takes it; tests/train/test_vision_attention.py), a fused kernel is refused."""
    model = from_hf_config(tiny_config(tiny_processor().tokenizer))
    config = base.get_config()
    config.model.attention = attention
    with pytest.raises(ConfigError, match=rf"attention='{attention}' cannot run Gemma 3 with"):
        kernel_choice.attention_for(RunSpec.of(config), model, 0)


def test_context_axis_refuses_images_and_takes_text(folder, files):
    """mesh.context reorders the tokens: refused with images; the same run on text is allowed."""
    spec = _spec(folder, **{"mesh.context": 2})
    with pytest.raises(ConfigError, match=r"config.mesh.context=2 with images"):
        check_values(spec, device_count=8, batch_shards=4)
    text = {"data.train_files": files["text_train"], "data.eval_files": files["text_eval"]}
    check_values(_spec(folder, **{"mesh.context": 2}, **text), device_count=8, batch_shards=4)


def test_image_data_on_a_text_model_names_the_model(folder, tmp_path):
    """The text model's folder has no image processor: the refusal names the model first."""
    text_model = tmp_path / "text_model"
    shutil.copytree(folder, text_model, ignore=shutil.ignore_patterns("*.safetensors", "cache"))
    hf_config = json.loads((folder / "config.json").read_text())["text_config"]
    config = transformers.Qwen2Config(**{**hf_config, "architectures": ["Qwen2ForCausalLM"]})
    config.save_pretrained(text_model)
    (text_model / "preprocessor_config.json").unlink()
    config = _base(folder)
    config.model.name_or_path = str(text_model)
    with pytest.raises(DataError, match=r"holds images, but config.model.name_or_path=.* is a"):
        open_run_data(RunSpec.of(config))


def test_a_file_opening_with_text_conversations_is_read_with_its_images(folder, files):
    """Text-only conversations first, then ones with images: read by the model's processor
    (the text pipeline refused every image example), the text ones trained beside them."""
    lines = Path(files["text_train"]).read_text() + (folder / "train.jsonl").read_text()
    mixed = _write(folder / "mixed.jsonl", [json.loads(line) for line in lines.splitlines()])
    data = open_run_data(_spec(folder, **{"data.train_files": mixed}))
    assert data.images  # the image fields of the family's rows
    counts = data.train_batches.cost[:, 1]  # images per document, in file order
    assert counts.tolist() == [0, 0, 0, 0, 2, 1, 1, 2, 1, 1, 2, 1]


def test_an_image_the_text_pipeline_meets_says_when_images_are_read():
    """Past the examples scanned (or in a mixture, or a pair): the text pipeline's refusal
    says when a file is read with images."""
    with pytest.raises(BadExample, match=r"when one of its first 256 examples holds one"):
        text_content(QUESTION, "messages[0].content")


def test_more_images_than_a_row_takes_names_the_document(folder):
    """Every third training conversation holds 2 images: over max_images_per_row=1."""
    spec = _spec(folder, **{"data.max_images_per_row": 1})
    message = r"document 0 holds 2 images, over config.data.max_images_per_row=1; raise"
    with pytest.raises(DataError, match=message):
        open_run_data(spec)


def test_all_tokens_trains_every_token_but_the_images(folder):
    """data.train_on='all_tokens' (an image inside the span it trains; refused as "an image
    placeholder lies in a trained reply" before): every token trained but the image tokens and
    their markers."""
    spec = _spec(folder, **{"data.train_on": "all_tokens"})
    data = open_run_data(spec).train_batches.data
    tokenizer = vision.load_processor(folder).tokenizer
    markers = tokenizer.convert_tokens_to_ids(
        ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>"]
    )
    for index in range(len(data)):
        tokens, trained = data.tokenized.document(index)
        image = np.isin(tokens, markers)
        assert image.sum() >= 6 and not trained[image].any() and trained[~image].all()
    # The mask certificate checks turns' spans: refused by name (it failed deep inside).
    with pytest.raises(UsageError, match=r"--check with config.data.train_on='all_tokens'"):
        inspect.check(spec, sample=0, as_json=False)


def _text_reference_loss(folder: Path, eval_file: str) -> float:
    """transformers' Qwen2_5_VLForConditionalGeneration on the processor's rendering of each
    text-only eval conversation: the token-weighted cross-entropy of the replies."""
    processor = vision.load_processor(folder)
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(folder).eval()
    nll, count = 0.0, 0
    for line in Path(eval_file).read_text().splitlines():
        messages = json.loads(line)["messages"]
        inputs = processor.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_tensors="pt"
        )
        ids = inputs["input_ids"][0].numpy()
        labels = _reply_labels(ids, processor.tokenizer)
        with torch.no_grad():
            log_probs = torch.log_softmax(model(**inputs).logits[0].double(), -1).numpy()
        targets, mask = labels[1:], labels[1:] != -100
        nll -= log_probs[:-1][np.arange(len(targets)), np.where(mask, targets, 0)][mask].sum()
        count += int(mask.sum())
    return nll / count


@pytest.mark.e2e
def test_text_data_on_the_image_text_model_matches_transformers(folder, files, tmp_path):
    """Text conversations train the image-text model as a text model (no image arrays in the
    rows, the vision tower unused), the sequence split over mesh.context=2 as for any text
    model: the step-0 eval loss equals transformers' on the same conversations; a step trains."""
    text = {"data.train_files": files["text_train"], "data.eval_files": files["text_eval"]}
    spec = _spec(folder, **text, **{"train.steps": 1, "mesh.context": 2})
    check_values(spec, device_count=2, batch_shards=1)  # allowed: no images
    assert not open_run_data(spec).images  # the text pipeline's rows, no image fields
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:2], context=2)
    run, losses = _train(spec, tmp_path, mesh)
    reference = _text_reference_loss(folder, files["text_eval"])
    print(f"text rows: eval loss {run.initial_eval['eval/loss']:.6f}, transformers {reference:.6f}")
    assert run.initial_eval["eval/loss"] == pytest.approx(reference, rel=1e-4)
    assert [step for step, _ in losses] == [1] and np.isfinite(losses[0][1])


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("fields", "tolerance"),
    [
        ({"model.remat": "full", "model.attention": "blockwise"}, 1e-4),
        ({"model.compute_dtype": "bfloat16", "model.remat": "save_matmuls"}, 2e-3),
    ],
    ids=["remat_full_blockwise", "bfloat16_save_matmuls"],
)
def test_remat_kernels_and_bfloat16_with_images(
    folder, reference_loss, tmp_path, fields, tolerance
):
    """The step-0 eval loss with images under a remat policy and the blockwise kernel (float32:
    equal to transformers'), and in bfloat16 compute (within bfloat16's precision); the train
    step (remat applies there) gives a finite loss."""
    spec = _spec(folder, **{"train.steps": 1, **fields})
    one = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    run, losses = _train(spec, tmp_path, one)
    loss = run.initial_eval["eval/loss"]
    print(f"{fields}: eval loss {loss:.6f}, transformers {reference_loss:.6f}")
    assert loss == pytest.approx(reference_loss, rel=tolerance)
    assert [step for step, _ in losses] == [1] and np.isfinite(losses[0][1])


def test_inspect_shows_image_documents_and_checks_the_image_role(folder, capsys):
    """`inspect` prints the documents the processor prepares (image tokens expanded) and the
    trainer's rows per epoch; `--check` certifies the image tokens untrained under the "image"
    role."""
    # Rows of 192 tokens would hold 3 documents each by tokens alone; 2 images a row split them.
    spec = _spec(folder, **{"data.max_images_per_row": 2, "data.max_length": 192})
    totals = inspect.report(spec, num_examples=1, as_json=False)
    shown = capsys.readouterr().out
    assert "<|vision_start|><|image_pad|>" in shown and "[[A red square ." in shown
    assert totals["train"]["examples_kept"] == 8
    # The rows of an epoch are the trainer's, packed under the image budget too.
    rows = open_run_data(spec).train_batches.epoch_rows(0)
    assert totals["train"]["rows_per_epoch"] == len(rows) == 6  # 3 by tokens alone
    assert totals["eval"]["rows_per_epoch"] > 0
    report = inspect.check(spec, sample=0, as_json=False)
    assert not report["violations"] and report["examples"] == 8
    image = report["categories"]["image"]
    assert image["untrained"] > 0 and image["trained"] == 0
    assert "image" in capsys.readouterr().out
