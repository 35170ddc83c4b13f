"""Image-text data beyond one in-memory file (issue 35): the stream loader's rows equal the
in-memory loader's, a mixture of an image source and a text source trains and resumes exactly,
and config.data.eval_fraction holds documents out with their images. The tiny Qwen2.5-VL
checkpoint and conversations are tests/loop/test_vision_training.py's."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from test_vision_training import _config, _train, folder, reference_loss  # noqa: F401 (fixtures)

from sft_jax.core.errors import ConfigError
from sft_jax.data import images as image_files
from sft_jax.data import pipeline, vision_source, vision_stream
from sft_jax.data.tokenize import from_documents
from sft_jax.train import sharding
from sft_jax.train.setup import open_run_data
from sft_jax.workdir.rundir import checkpoints_path

TEXT = [("What is 42 ?", "It is 42 !"), ("Draw this", "A red square ."), ("And", "Draw this")]


def test_streamed_rows_equal_the_in_memory_rows(folder, monkeypatch):  # noqa: F811
    """Unshuffled, with a window of one epoch's documents, the stream loader packs the same rows
    in the same order as the in-memory loader (every array equal, images included); shuffled,
    a window holds each document once, as an epoch does. A restart reads the store and opens
    no image file."""
    memory = open_run_data(_config(folder, shuffle=False, loader="memory", eval_files=""))
    count = len(memory.train_batches.data)
    spec = _config(folder, shuffle=False, loader="stream", stream_window=count, eval_files="")
    streamed = open_run_data(spec)
    assert isinstance(streamed.train_batches, vision_stream.VisionStreamBatches)
    assert streamed.images == memory.images
    # The stream's bound on documents a row is known before reading: the configured one.
    assert streamed.max_segments == spec.data.max_documents_per_row + 1 > memory.max_segments
    first = None
    for _ in range(4):  # two epochs
        expected, got = next(memory.train_batches), next(streamed.train_batches)
        first = got if first is None else first
        assert sorted(got) == sorted(expected)
        for name in expected:
            np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
        assert got["vision_patches"].any()
    shuffled = open_run_data(spec.with_values({"data.shuffle": True}))
    window = [d for row in shuffled.train_batches.epoch_rows(0) for d in row]
    assert sorted(window) == list(range(count))
    monkeypatch.setattr(image_files, "open_image", _no_image)
    again = next(open_run_data(spec).train_batches)
    np.testing.assert_array_equal(again["vision_patches"], first["vision_patches"])


def _no_image(source):
    raise AssertionError(f"a restart opened the image {source}")


def _text_source(model_dir: Path) -> Path:
    path = model_dir / "text.jsonl"
    lines = [
        json.dumps(
            {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        )
        for q, a in TEXT
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def _mixture(model_dir: Path, save_every: int = 0):
    mixture = [
        {"name": "images", "train_files": str(model_dir / "train.jsonl"), "weight": 2.0,
         "eval_files": str(model_dir / "eval.jsonl")},
        {"name": "text", "train_files": str(_text_source(model_dir)), "weight": 1.0},
    ]  # fmt: skip
    return _config(
        model_dir, save_every, train_files="", eval_files="", mixture=mixture, stream_window=24
    )


@pytest.mark.e2e
def test_a_mixture_of_images_and_text_trains_and_resumes_exactly(folder, reference_loss, tmp_path):  # noqa: F811
    """loader='auto' streams a mixture; its rows hold documents of both sources (the image
    documents with their patches); the step-0 eval loss on the image source's eval file is
    transformers'; 3 steps saved at step 2; the WORKDIR without its last checkpoint resumes at
    step 2 and logs the same step-3 loss."""
    spec = _mixture(folder, save_every=2)
    data = open_run_data(spec)
    batches = data.train_batches
    assert isinstance(batches, vision_stream.VisionStreamBatches)
    refs = [d for row in batches.epoch_rows(0) for d in row]
    sizes = batches.documents.sizes
    assert sizes[1] == len(TEXT) and sum(r >= sizes[0] for r in refs) == 8  # 1/3 of 24
    first = next(batches)
    assert first["vision_patches"].any() and first["vision_grids"].any()
    one = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    run, straight = _train(spec, tmp_path / "straight", one)
    assert [step for step, _ in straight] == [1, 2, 3]
    assert all(np.isfinite(loss) for _, loss in straight)
    assert run.initial_eval["eval/loss"] == pytest.approx(reference_loss, rel=1e-4)
    shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
    shutil.rmtree(checkpoints_path(tmp_path / "resumed") / "3")
    (tmp_path / "resumed" / "metrics.jsonl").unlink()
    _, resumed = _train(spec, tmp_path / "resumed", one)
    assert [step for step, _ in resumed] == [3]
    assert resumed[0][1] == pytest.approx(straight[2][1], rel=1e-6)


def test_eval_fraction_holds_documents_out_with_their_images(folder):  # noqa: F811
    """The held-out documents are the full store's documents at pipeline.held_out's ids, each
    with its own image arrays; the rest train. eval_max_examples caps an eval file."""
    spec = _config(folder, eval_files="", eval_fraction=0.25, packing=False)
    data = open_run_data(spec)
    full = open_run_data(_config(folder, eval_files="", packing=False)).train_batches.data
    train_ids, eval_ids = pipeline.held_out(len(full), 0.25, spec.train.seed)
    assert len(eval_ids) == 2 and len(data.train_batches.data) == len(train_ids)
    rows = [row for batch in data.eval_batches() for row in _rows(batch)]
    for index, (tokens, patches) in zip(eval_ids, rows, strict=False):
        document = full.document(int(index))
        np.testing.assert_array_equal(tokens, document.tokens)
        np.testing.assert_array_equal(patches, document.images["pixel_values"])
    assert len([r for r in rows if len(r[0])]) == len(eval_ids)
    capped = open_run_data(_config(folder, eval_max_examples=2, packing=False))  # of 5
    assert len([r for b in capped.eval_batches() for r in _rows(b) if len(r[0])]) == 2
    assert vision_source.has_images(spec)


def _rows(batch: dict) -> list[tuple[np.ndarray, np.ndarray]]:
    """(tokens, image patches) of each row of an unpacked batch."""
    out = []
    for row in range(len(batch["input_ids"])):
        length = int((batch["segment_ids"][row] > 0).sum())
        patches = int(np.prod(batch["vision_grids"][row], axis=1).sum())
        out.append((batch["input_ids"][row][:length], batch["vision_patches"][row][:patches]))
    return out


def test_max_examples_takes_the_first_examples_and_contamination_is_refused(folder):  # noqa: F811
    """A source's max_examples keeps its first examples (their documents and images equal the
    whole file's first ones); the contamination check (text only) is refused with images."""
    spec = _mixture(folder)
    entries = [{**spec.data.mixture[0], "max_examples": 3}, spec.data.mixture[1]]
    cut = open_run_data(spec.with_values({"data.mixture": entries})).train_batches.documents
    whole = open_run_data(spec).train_batches.documents
    assert list(cut.sizes) == [3, len(TEXT)] and list(whole.sizes) == [8, len(TEXT)]
    for index in range(3):
        expected, got = whole.vision_document(index), cut.vision_document(index)
        np.testing.assert_array_equal(got.tokens, expected.tokens)
        np.testing.assert_array_equal(got.images["pixel_values"], expected.images["pixel_values"])
    with pytest.raises(ConfigError, match=r"config.data.contamination='report' with images"):
        open_run_data(spec.with_values({"data.contamination": "report"}))


def test_several_files_with_images_give_the_documents_of_one(folder, tmp_path):  # noqa: F811
    """train.jsonl split in two files in two folders (image paths relative to each file's
    folder): the same documents with the same image arrays as the one file."""
    lines = (folder / "train.jsonl").read_text().splitlines(keepends=True)
    for part, chunk in (("a", lines[:3]), ("b", lines[3:])):
        (tmp_path / part).mkdir()
        (tmp_path / part / "train.jsonl").write_text("".join(chunk))
        for image in folder.glob("img*.png"):
            shutil.copy(image, tmp_path / part / image.name)
    one = open_run_data(_config(folder, eval_files="")).train_batches.data
    spec = _config(folder, eval_files="", train_files=str(tmp_path / "*" / "train.jsonl"))
    both = open_run_data(spec).train_batches.data
    assert len(both) == len(one) == 8
    for index in range(len(one)):
        expected, got = one.document(index), both.document(index)
        np.testing.assert_array_equal(got.tokens, expected.tokens)
        np.testing.assert_array_equal(got.trained, expected.trained)
        for name, value in expected.images.items():
            np.testing.assert_array_equal(got.images[name], value, err_msg=name)
    assert both.tokenized.stats["images"] == one.tokenized.stats["images"] == 11


def test_prepared_stores_serve_both_loaders_without_opening_an_image(folder, tmp_path, monkeypatch):  # noqa: F811
    """`python -m sft_jax.data.prepare`'s step on a mixture with images writes every source's
    train and eval store; training then reads them, in memory or streamed, and opens no image."""
    spec = _mixture(folder).with_values({"data.cache_dir": str(tmp_path)})
    names = [name for name, _ in vision_stream.prepare_stores(spec)]
    assert names == ["images", "images eval", "text"]
    monkeypatch.setattr(image_files, "open_image", _no_image)
    assert next(open_run_data(spec).train_batches)["vision_patches"].any()
    memory = {"data.cache_dir": str(tmp_path), "data.loader": "memory"}
    files = {
        "data.train_files": str(folder / "train.jsonl"),
        "data.eval_files": str(folder / "eval.jsonl"),
    }
    single = _config(folder).with_values({**memory, **files})
    vision_stream.prepare_stores(single)
    assert next(open_run_data(single).train_batches)["vision_patches"].any()


def test_the_documents_fingerprint_hashed_in_slices_is_the_whole_arrays_hash(monkeypatch):
    """content_fingerprint reads a store a slice at a time (a streamed store is never all in
    memory) and gives the digest of the whole arrays at once."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 50, 300)
    documents = [(rng.integers(0, 1000, n).astype(np.int32), rng.random(n) > 0.5) for n in lengths]
    tokenized = from_documents(documents, {})
    whole = hashlib.blake2b(digest_size=16)
    for array in (tokenized.tokens, tokenized.trained, tokenized.offsets):
        whole.update(np.ascontiguousarray(array).tobytes())
    monkeypatch.setattr(pipeline, "_HASHED_AT_ONCE", 100)
    assert pipeline.content_fingerprint(tokenized) == "documents:" + whole.hexdigest()
