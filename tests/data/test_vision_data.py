"""Chat examples with images (issue 35): tokens, trained flags and per-image arrays from the
model's own processor, against that processor's output for the same conversation.

The processors are tiny and built here, offline: a WordLevel tokenizer with the family's special
tokens and its real chat template, the family's real image processor class with tiny sizes,
wrapped in Gemma3Processor / Qwen2_5_VLProcessor.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from unittest import mock

import numpy as np
import PIL.Image
import pytest
import transformers
from chat_tokenizers import TEMPLATE_DIR, WORDS, pieces, word_level

from sft_jax.data import certificate, records, vision
from sft_jax.data.records import DataError
from sft_jax.data.tokenize import Options, tokenize_records
from sft_jax.data.vision_check import image_checker
from sft_jax.data.vision_data import prepare_vision_data

GEMMA_MARKERS = ["<start_of_image>", "<end_of_image>", "<image_soft_token>"]
QWEN_MARKERS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
SIZES = [(16, 24), (24, 16)]  # (height, width) of the two images of a conversation
REPLIES = ["A red square .", "It is 42 !"]


def _tokenizer(specials: list[str], **kwargs) -> transformers.PreTrainedTokenizerFast:
    corpus = pieces(WORDS + " What is this ? And A red square . It is 42 ! Draw")
    backend = word_level([*corpus, " ", "\n", "\n\n", "\n\n\n"], specials)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", **kwargs
    )


@pytest.fixture(scope="module")
def gemma(tmp_path_factory) -> transformers.ProcessorMixin:
    """Gemma 3's processor saved to a folder and loaded back as training loads it."""
    specials = ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>", *GEMMA_MARKERS]
    names = ("boi_token", "eoi_token", "image_token")
    tokenizer = _tokenizer(
        specials, bos_token="<bos>", eos_token="<eos>",
        extra_special_tokens=dict(zip(names, GEMMA_MARKERS, strict=True)),
    )  # fmt: skip
    template = (TEMPLATE_DIR / "google-gemma-3-it.jinja").read_text(encoding="utf-8")
    images = transformers.Gemma3ImageProcessor(size={"height": 8, "width": 8})
    processor = transformers.Gemma3Processor(images, tokenizer, template, image_seq_length=4)
    folder = tmp_path_factory.mktemp("gemma3")
    processor.save_pretrained(folder)
    return vision.load_processor(folder)


@pytest.fixture(scope="module")
def qwen() -> transformers.ProcessorMixin:
    """Qwen2.5-VL's processor. Built in memory: without torchvision (not installed here) its
    video processor cannot exist, and transformers checks every sub-processor's class, so
    the check lets the absent video processor pass (images never use it)."""
    tokenizer = _tokenizer(
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *QWEN_MARKERS], eos_token="<|im_end|>"
    )
    template = (TEMPLATE_DIR / "Qwen-Qwen2.5-VL-7B-Instruct.jinja").read_text(encoding="utf-8")
    images = transformers.Qwen2VLImageProcessor(
        min_pixels=8 * 8, max_pixels=24 * 24, patch_size=4, merge_size=2, temporal_patch_size=2
    )
    check = transformers.ProcessorMixin.check_argument_for_proper_class

    def lenient(self, name, argument):
        return None if argument is None else check(self, name, argument)

    with mock.patch.object(transformers.ProcessorMixin, "check_argument_for_proper_class", lenient):
        processor = transformers.Qwen2_5_VLProcessor(
            images, tokenizer, None, chat_template=template
        )
    tokenizer.chat_template = template
    return processor


FAMILIES = {"gemma": ("<end_of_turn>", GEMMA_MARKERS), "qwen": ("<|im_end|>", QWEN_MARKERS)}


@pytest.fixture(params=sorted(FAMILIES))
def family(request) -> tuple[str, transformers.ProcessorMixin]:
    return request.param, request.getfixturevalue(request.param)


def _images(folder: Path) -> list[Path]:
    paths = []
    for index, (height, width) in enumerate(SIZES):
        pixels = np.random.default_rng(index).integers(0, 256, (height, width, 3), np.uint8)
        path = folder / f"img{index}.png"
        PIL.Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def _messages(parts: list[dict]) -> list[dict]:
    """Two user turns with one image each (`parts[k]` stands for image k), two replies."""
    return [
        {"role": "user", "content": [parts[0], {"type": "text", "text": "What is this ?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": REPLIES[0]}]},
        {"role": "user", "content": [{"type": "text", "text": "And"}, parts[1]]},
        {"role": "assistant", "content": REPLIES[1]},
    ]


def _trl(paths: list[Path]) -> dict:
    return {"messages": _messages([{"type": "image"}] * 2), "images": [p.name for p in paths]}


def _write(folder: Path, examples: list[dict], name: str = "train.jsonl") -> Path:
    path = folder / name
    path.write_text("".join(json.dumps(e) + "\n" for e in examples))
    return path


def _tokenize(processor, path: Path, max_length: int = 4096, skip: bool = False):
    options = Options("messages", "all_assistant", max_length, skip)
    read = records.read_records(str(path), "train", None)
    return vision.tokenize_vision_records(processor, read, options, path.parent)


def _runs(flags: np.ndarray) -> list[slice]:
    edges = np.flatnonzero(np.diff(np.concatenate([[0], flags.astype(int), [0]])))
    return [slice(a, b) for a, b in zip(edges[::2], edges[1::2], strict=True)]


def test_trained_tokens_images_and_arrays_equal_the_processors(family, tmp_path):
    name, processor = family
    end_of_turn, markers = FAMILIES[name]
    paths = _images(tmp_path)
    (document,), stats = _tokenize(processor, _write(tmp_path, [_trl(paths)]))
    # The processor's own rendering and preprocessing of the same conversation.
    pil = [PIL.Image.open(p) for p in paths]
    reference = processor.apply_chat_template(
        _messages([{"type": "image", "image": image} for image in pil]),
        tokenize=True, return_dict=True,
    )  # fmt: skip
    np.testing.assert_array_equal(document.tokens, reference["input_ids"][0])
    fields = {k for k in reference if k not in vision.TEXT_FIELDS}
    assert set(document.images) == fields and fields >= {"pixel_values"}
    for field in fields:
        np.testing.assert_array_equal(document.images[field], np.asarray(reference[field]))
    # The trained tokens are exactly the two replies and their end-of-turn tokens.
    tokenizer = processor.tokenizer
    replies = [tokenizer.decode(document.tokens[run]) for run in _runs(document.trained)]
    assert replies == [reply + end_of_turn for reply in REPLIES]
    # Each image's tokens: the processor's count; no image token or vision marker trains.
    expected = processor._get_num_multimodal_tokens(image_sizes=SIZES)["num_image_tokens"]
    assert document.image_tokens.tolist() == list(expected)
    image_ids = [i for i in processor.image_token_ids if i is not None]
    assert np.isin(document.tokens, image_ids).sum() == sum(expected)
    vision_ids = tokenizer.convert_tokens_to_ids(markers)
    assert np.isin(document.tokens, vision_ids).sum() > sum(expected)
    assert not document.trained[np.isin(document.tokens, vision_ids)].any()
    assert stats["images"] == 2 and stats["trainable_tokens"] == int(document.trained.sum())


def test_images_column_image_url_and_parquet_bytes_agree(family, tmp_path):
    _, processor = family
    paths = _images(tmp_path)
    data = [p.read_bytes() for p in paths]
    uri = "data:image/png;base64," + base64.b64encode(data[0]).decode()
    openai = {
        "messages": _messages([
            {"type": "image_url", "image_url": {"url": uri}},
            {"type": "image_url", "image_url": {"url": f"file://{paths[1]}"}},
        ])
    }  # fmt: skip
    (trl,), _ = _tokenize(processor, _write(tmp_path, [_trl(paths)]))
    (url,), _ = _tokenize(processor, _write(tmp_path, [openai], "openai.jsonl"))
    own = {
        "messages": _messages(
            [{"type": "image", "image": "img0.png"}, {"type": "image", "path": str(paths[1])}]
        )
    }
    (inline,), _ = _tokenize(processor, _write(tmp_path, [own], "inline.jsonl"))
    # As `datasets` stores an Image feature in Parquet ({"bytes": ..., "path": ...}) and
    # messages (structs: a part's missing fields are null).
    import pyarrow as pa
    import pyarrow.parquet as pq

    messages = _messages([{"type": "image"}] * 2)
    messages[3]["content"] = [{"type": "text", "text": REPLIES[1]}]  # one type per column
    stored = [{"bytes": d, "path": p.name} for d, p in zip(data, paths, strict=True)]
    parquet = tmp_path / "train.parquet"
    pq.write_table(pa.table({"messages": [messages], "images": [stored]}), parquet)
    row = next(records.read_records(str(parquet), "train", None))  # images from the column
    assert row.value["messages"][0]["content"][0] == {"type": "image", "text": None}
    (table,), _ = vision.tokenize_vision_records(
        processor, [row], Options("messages", "all_assistant", 4096, False), Path("/nonexistent")
    )
    # As a hub dataset's Image column gives them: decoded PIL images.
    hub = records.Record(
        "hf:x[train]: row 0", {**_trl(paths), "images": [PIL.Image.open(p) for p in paths]}
    )
    (decoded,), _ = vision.tokenize_vision_records(
        processor, [hub], Options("messages", "all_assistant", 4096, False), Path("/nonexistent")
    )
    for other in (url, inline, table, decoded):
        np.testing.assert_array_equal(other.tokens, trl.tokens)
        np.testing.assert_array_equal(other.trained, trl.trained)
        for field, array in trl.images.items():
            np.testing.assert_array_equal(other.images[field], array)


def test_bad_images_are_named_errors_or_counted_skips(gemma, tmp_path):
    paths = _images(tmp_path)
    (tmp_path / "broken.png").write_bytes(paths[0].read_bytes()[:60])  # a cut-off PNG
    web = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
    bad = [
        {**_trl(paths), "images": ["img0.png", "missing.png"]},
        {**_trl(paths), "images": ["img0.png", "broken.png"]},
        {**_trl(paths), "images": ["img0.png"]},
        {"messages": _messages([{"type": "image"}, web]), "images": ["img0.png"]},
        _trl(paths),
    ]
    path = _write(tmp_path, bad)
    errors = [
        r"image 1 \(missing.png\): no such file .*missing.png",
        r"image 1 \(broken.png\) cannot be decoded",
        r"the messages have 2 \{'type': 'image'\} parts but field 'images' holds 1 images",
        r"image 1 \(https://example.com/cat.png\) is a web URL; sft_jax reads data offline",
    ]
    for example, message in zip(bad, errors, strict=False):
        single = _write(tmp_path, [example], "one.jsonl")
        with pytest.raises(DataError, match=rf"one.jsonl:1: {message}.*skip_bad_examples=True"):
            _tokenize(gemma, single)
    with pytest.raises(DataError, match=r"train.jsonl:1: image 1 \(missing.png\)"):
        _tokenize(gemma, path)
    documents, stats = _tokenize(gemma, path, skip=True)
    assert len(documents) == 1 and stats["examples_kept"] == 1
    assert stats["dropped"] == {"bad_image": 2, "image_count_mismatch": 1, "image_url_offline": 1}


def test_overlong_documents_truncate_after_their_images_never_through_them(gemma, tmp_path):
    paths = _images(tmp_path)
    path = _write(tmp_path, [_trl(paths)])
    (full,), _ = _tokenize(gemma, path)
    (cut,), stats = _tokenize(gemma, path, max_length := len(full.tokens) - 2)
    np.testing.assert_array_equal(cut.tokens, full.tokens[:max_length])
    assert stats["truncated"] == 1 and cut.image_tokens.tolist() == full.image_tokens.tolist()
    image_ids = [i for i in gemma.image_token_ids if i is not None]
    through = int(np.flatnonzero(np.isin(full.tokens, image_ids))[-1])  # inside the last image
    documents, stats = _tokenize(gemma, path, through)
    assert documents == [] and stats["dropped"] == {"too_long": 1}


def test_a_folder_without_an_image_processor_is_refused(tmp_path):
    _tokenizer(["<bos>"], bos_token="<bos>").save_pretrained(tmp_path)
    with pytest.raises(DataError, match=rf"{tmp_path}: the processor \w+ has no image processor"):
        vision.load_processor(tmp_path)


def test_an_image_in_a_reply_is_refused(gemma, tmp_path):
    example = {
        "messages": [
            {"role": "user", "content": "Draw ."},
            {"role": "assistant", "content": [{"type": "image"}]},
        ],
        "images": ["img0.png"],
    }
    _images(tmp_path)
    with pytest.raises(DataError, match=r"train.jsonl:1: messages\[1\] is an assistant message"):
        _tokenize(gemma, _write(tmp_path, [example]))


def test_the_certificate_counts_image_tokens(family, tmp_path):
    _, processor = family
    paths = _images(tmp_path)
    path = _write(tmp_path, [_trl(paths)])
    options = Options("messages", "all_assistant", 4096, False)
    read = list(records.read_records(str(path), "train", None))
    report = certificate.check_records(
        processor.tokenizer, read, options, image_checker(processor, options, tmp_path)
    )
    (document,), _ = _tokenize(processor, path)
    tokenizer = processor.tokenizer
    if family[0] == "gemma":  # each image's expansion: "\n\n<boi><soft> x 4<eoi>\n\n"
        per_image = tokenizer(processor.full_image_sequence, add_special_tokens=False)
        images = 2 * len(per_image["input_ids"])
    else:  # <|vision_start|><|image_pad|> x n<|vision_end|>
        images = int(np.sum(document.image_tokens)) + 2 * 2
    counts = report["categories"]
    assert report["violations"] == [] and report["documents"] == 1
    assert counts["image"] == {"trained": 0, "untrained": images}
    assert sum(c["trained"] for c in counts.values()) == int(document.trained.sum())
    assert counts["assistant"]["trained"] == sum(len(pieces(reply)) for reply in REPLIES)
    assert counts["glue"]["trained"] == 2  # each reply's end-of-turn token
    assert sum(c["trained"] + c["untrained"] for c in counts.values()) == len(document.tokens)


def test_the_store_keeps_the_arrays_and_a_restart_opens_no_image(family, tmp_path):
    _, processor = family
    paths = _images(tmp_path)
    text_only = {
        "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    }
    path = _write(tmp_path, [text_only, _trl(paths), _trl(paths[::-1])])
    options = Options("messages", "all_assistant", 4096, False)
    (_, *fresh), _ = _tokenize(processor, path)
    first = prepare_vision_data(processor, str(path), "train", options, tmp_path / "store")
    with mock.patch.object(PIL.Image, "open", side_effect=AssertionError("an image was opened")):
        again = prepare_vision_data(processor, str(path), "train", options, tmp_path / "store")
    assert len(again) == len(first) == 3
    empty = again.document(0).images  # the text-only document: no rows of any array
    assert set(empty) == set(fresh[0].images) and all(len(a) == 0 for a in empty.values())
    for index, expected in enumerate(fresh, start=1):
        stored = again.document(index)
        np.testing.assert_array_equal(stored.tokens, expected.tokens)
        np.testing.assert_array_equal(stored.trained, expected.trained)
        np.testing.assert_array_equal(stored.image_tokens, expected.image_tokens)
        assert set(stored.images) == set(expected.images)
        for field, array in expected.images.items():
            assert stored.images[field].dtype == array.dtype
            np.testing.assert_array_equal(stored.images[field], array)
    # A changed image file is a new store (its size and time are in the key): decoded again.
    PIL.Image.new("RGB", (8, 8)).save(paths[0])
    with mock.patch.object(PIL.Image, "open", wraps=PIL.Image.open) as opened:
        prepare_vision_data(processor, str(path), "train", options, tmp_path / "store")
    assert opened.call_count == 4


def test_certify_checks_image_data_with_the_models_processor(gemma, tmp_path):
    """`inspect --check`'s certificate (pipeline.certify) of data with images: the processor
    of config.data.tokenizer's folder, image paths from each source's folder."""
    from test_data import base_config

    from sft_jax.core.spec import RunSpec
    from sft_jax.data.pipeline import certify

    folder = tmp_path / "gemma3"
    gemma.save_pretrained(folder)
    data = tmp_path / "data"
    data.mkdir()
    path = _write(data, [_trl(_images(data))] * 2)
    config = base_config()
    config.data.tokenizer, config.data.train_files = str(folder), str(path)
    config.data.eval_files, config.data.max_length = "", 512
    report = certify(RunSpec.of(config), None)
    (document, _), _ = _tokenize(gemma, path)
    assert report["examples"] == 2 and report["violations"] == []
    assert report["categories"]["image"]["trained"] == 0
    assert report["categories"]["image"]["untrained"] == 2 * 2 * 8  # 2 examples, 2 images
    assert sum(c["trained"] for c in report["categories"].values()) == 2 * document.trained.sum()
    # Text-only tokenization refuses the example by name rather than as a mistyped field.
    text = Options("messages", "all_assistant", 512, False)
    with pytest.raises(DataError, match=r"train.jsonl:1: field 'messages\[0\].content' holds an"):
        tokenize_records(gemma.tokenizer, records.read_records(str(path), "train", None), text)
