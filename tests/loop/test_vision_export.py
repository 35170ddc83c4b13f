"""The export of an image-text run (issue 35) holds the processor's files beside the weights and
the tokenizer: the processor built from the export alone prepares an image exactly as the
source model's does, and transformers' model loaded from the export gives our trained model's
logits on it. The tiny Qwen2.5-VL checkpoint is tests/loop/test_vision_training.py's."""

from __future__ import annotations

import json

import jax
import numpy as np
import PIL.Image
import torch
import transformers
from test_gemma3_vision import BOI, tiny_processor
from test_vision_training import _config, _train, folder  # noqa: F401 (the fixture)

from sft_jax.data import processor_parts, vision, vision_source
from sft_jax.loop.export import export_run, trained_run_model
from sft_jax.train import sharding

QUESTION = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this ?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "A red square ."}]},
]


def _inputs(processor, image: PIL.Image.Image) -> dict[str, np.ndarray]:
    text = processor.apply_chat_template(QUESTION, tokenize=False)
    out = processor(text=[text], images=[image], return_tensors="np")
    return {name: np.asarray(value) for name, value in out.items()}


def _our_logits(model, config, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """Our model's logits of the processor's output as one row of the run's image layout."""
    ids = inputs["input_ids"][0]
    layout = vision_source.budget_layout(config, model.config)
    document = {"input_ids": ids, "pixel_values": inputs["pixel_values"]}
    document["image_grid_thw"] = inputs["image_grid_thw"]
    images = {name: value[None] for name, value in layout.row([document]).items()}
    row = np.zeros((1, config.data.max_length), np.int32)
    tokens, positions, segments = row.copy(), row.copy(), row.copy()
    tokens[0, : len(ids)], positions[0, : len(ids)], segments[0, : len(ids)] = (
        ids,
        range(len(ids)),
        1,
    )
    hidden = model.hidden_states(tokens, positions, segments, images=images)
    return np.asarray(model.logits(hidden))[0, : len(ids)]


def test_the_export_holds_the_processor_and_transformers_runs_it_on_images(folder, tmp_path):  # noqa: F811
    """Two trained steps (the first at warm-up lr 0), exported: the processor's files copied
    from the model folder; the processor from the export's parts (and transformers' image
    processor class from it directly) gives the source's arrays on an image; transformers'
    Qwen2.5-VL from the export gives our trained model's logits on the processor's output."""
    spec = _config(folder, save_every=2, steps=2, eval_files="")
    one = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    _train(spec, tmp_path / "run", one)
    out = export_run(tmp_path / "run", which="last", out=tmp_path / "export")
    for name in ("preprocessor_config.json", "chat_template.jinja", "tokenizer.json"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "preprocessor_config.json").read_text())
    assert saved == json.loads((folder / "preprocessor_config.json").read_text())

    image = PIL.Image.open(folder / "img1.png").convert("RGB")
    source = processor_parts.processor_from_parts(folder)
    exported = processor_parts.processor_from_parts(out)
    assert type(exported).__name__ == "Qwen2_5_VLProcessor"
    expected = _inputs(source, image)
    for processor in (exported, vision.load_processor(out)):
        got = _inputs(processor, image)
        assert sorted(got) == sorted(expected)
        for name in expected:
            np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
    cls = type(source.image_processor)  # Qwen2VLImageProcessorPil here (no torchvision)
    direct = cls.from_pretrained(out)(images=[image], return_tensors="np")
    np.testing.assert_array_equal(direct["pixel_values"], expected["pixel_values"])
    np.testing.assert_array_equal(direct["image_grid_thw"], expected["image_grid_thw"])

    hf_model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(out).eval()
    with torch.no_grad():
        tensors = {name: torch.tensor(value) for name, value in expected.items()}
        hf_logits = hf_model(**tensors).logits[0].double().numpy()
    ours, _ = trained_run_model(tmp_path / "run", which="last")
    logits = _our_logits(ours, spec, expected)
    assert np.abs(logits - hf_logits).max() / np.abs(hf_logits).max() < 1e-4
    untrained = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(folder).eval()
    with torch.no_grad():
        before = untrained(**tensors).logits[0].double().numpy()
    assert np.abs(before - hf_logits).max() > 1e-3  # the export holds the trained weights


def test_processor_files_copy_only_for_image_models_and_keep_the_runs_template(tmp_path):
    """A text model's folder gives nothing; a file the export holds already (the chat template
    the run's tokenizer wrote) is kept."""
    source, out = tmp_path / "source", tmp_path / "out"
    source.mkdir(), out.mkdir()
    (source / "chat_template.jinja").write_text("source template")
    assert processor_parts.copy_processor_files(source, out) == []
    (source / "preprocessor_config.json").write_text("{}")
    (out / "chat_template.jinja").write_text("the run's template")
    assert processor_parts.copy_processor_files(source, out) == ["preprocessor_config.json"]
    assert (out / "chat_template.jinja").read_text() == "the run's template"


def test_auto_processor_loads_from_an_export_folder(tmp_path):
    """Gemma 3's processor as transformers 5 saves it (the image processor's settings inside
    processor_config.json): an export folder holding the tokenizer and the copied files loads
    with AutoProcessor and gives the source processor's arrays (its image_seq_length too)."""
    processor = tiny_processor()
    processor.save_pretrained(tmp_path / "source")
    processor.tokenizer.save_pretrained(tmp_path / "export")
    copied = processor_parts.copy_processor_files(tmp_path / "source", tmp_path / "export")
    assert copied == ["processor_config.json"]
    loaded = transformers.AutoProcessor.from_pretrained(tmp_path / "export")
    image = PIL.Image.fromarray(np.arange(30 * 20 * 3, dtype=np.uint8).reshape(30, 20, 3))
    text = f"What is {BOI} here ?"
    expected = processor(text=[text], images=[[image]], return_tensors="np")
    got = loaded(text=[text], images=[[image]], return_tensors="np")
    assert sorted(got) == sorted(expected)
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
