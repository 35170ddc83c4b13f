"""config.data with images -> the DataSource of an image-text model: the examples prepared once
by the model's processor into the store (data/vision_data.py), packed into rows with their
images (data/vision_batches.py), each row's image arrays those of the model's family
(models/image_rows.py)."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np

from sft_jax.core.spec import RunSpec
from sft_jax.data import batches, images, pipeline, records, vision, vision_batches
from sft_jax.data.records import DataError
from sft_jax.data.vision_data import VisionData, prepare_vision_data
from sft_jax.models.config import from_hf_config
from sft_jax.models.image_rows import ImageBudget, ImageLayout, layout_of
from sft_jax.models.io.files import load_hf_config, resolve_model_dir

log = logging.getLogger(__name__)


def has_images(config: RunSpec) -> bool:
    """Does the first training example hold an image? (A mixture's sources are not read
    here: mixtures take text only for now.)"""
    if not config.data.train_files or config.data.mixture:
        return False
    sources = records.expand_sources(config.data.train_files, "config.data.train_files")
    stream = records.read_records(sources[0], config.data.train_split, _Ignore())
    first = next(iter(stream), None)
    return first is not None and images.has_images(first.value)


class _Ignore:
    def bad(self, where: str, problem: str, reason: str) -> None:
        del where, problem, reason


def budget_layout(config: RunSpec, model: Any) -> ImageLayout | None:
    """The image layout of `model` (a ModelConfig) for rows of config.data's budget; None for a
    text model."""
    data = config.data
    budget = ImageBudget(data.max_length, data.max_images_per_row, data.max_image_patches_per_row)
    return layout_of(model, budget)


def step_images(layout: ImageLayout | None) -> dict[str, tuple]:
    """StepOptions' `images` (the image fields and their per-row shapes) of a layout, or {}."""
    if layout is None:
        return {}
    shapes = {**layout.per_row, **dict.fromkeys(layout.token_fields, ())}
    return {"images": tuple(shapes.items())}


def run_layout(config: RunSpec) -> ImageLayout:
    """The model family's image layout for rows of config.data's budget."""
    model = from_hf_config(load_hf_config(resolve_model_dir(config.model.name_or_path)))
    layout = budget_layout(config, model)
    if layout is None:
        raise DataError(
            f"config.data.train_files holds images, but config.model.name_or_path="
            f"{config.model.name_or_path!r} is a text model; use an image-text model."
        )
    return layout


def _prepared(config: RunSpec, processor: Any, files: str, split: str, field: str) -> VisionData:
    sources = records.expand_sources(files, field)
    if len(sources) != 1:
        raise DataError(f"{field}: data with images is read from one local file for now.")
    options = pipeline.tokenize_options(config.data, sources, split)
    cache = config.data.cache_dir if config.data.cache_dir not in ("", "none") else ""
    store = Path(cache or pipeline.default_cache_dir()).expanduser() / "images"
    return prepare_vision_data(processor, sources[0], split, options, store)


def fingerprint(data: VisionData) -> str:
    """pipeline.content_fingerprint of the tokens, with each document's image and patch counts
    (the lengths of its processor arrays) folded in: a resume on other images is refused where
    their number or size differs (an image changed in place at the same size is not seen)."""
    digest = hashlib.blake2b(pipeline.content_fingerprint(data.tokenized).encode(), digest_size=16)
    for name, lengths in sorted(data.image_lengths().items()):
        digest.update(name.encode() + np.ascontiguousarray(lengths, np.int64).tobytes())
    return batches.DOCUMENTS_FINGERPRINT + digest.hexdigest()


def open_vision_data(config: RunSpec, feed: tuple[int, int] | None = None) -> pipeline.DataSource:
    """The DataSource of an image-text model's SFT data (train file, eval file or none)."""
    data = config.data
    if data.eval_fraction > 0:
        raise DataError(
            "config.data.eval_fraction with images is not supported yet; give the eval examples "
            "as config.data.eval_files."
        )
    source = data.tokenizer or str(resolve_model_dir(config.model.name_or_path))
    processor = vision.load_processor(source, data.chat_template)
    layout = run_layout(config)
    if data.train_on != "all_tokens":
        pipeline.check_at_start(config, processor.tokenizer)
    train_data = _prepared(config, processor, data.train_files, data.train_split, "train_files")
    budget = (data.max_length, data.max_images_per_row, data.max_image_patches_per_row)
    train = vision_batches.VisionTrainBatches(
        train_data,
        layout,
        budget,
        **pipeline.row_options(config, feed),
        fingerprint=fingerprint(train_data),
        max_docs=data.max_documents_per_row,
    )
    log.info("train: %s", pipeline.summary_line(train_data.tokenized.stats))
    documents, evaluation = train.documents_per_row(), []
    if data.eval_files:
        eval_data = _prepared(config, processor, data.eval_files, data.eval_split, "eval_files")
        evaluation, most = vision_batches.eval_batches(
            eval_data,
            layout,
            budget,
            global_rows=config.eval.global_batch_size,
            packing=data.packing,
            max_docs=data.max_documents_per_row,
            share=pipeline.row_share(feed),
            max_examples=data.eval_max_examples,
        )
        documents = max(documents, most)
        if max(config.eval.generate_examples, config.eval.show_samples) > 0:
            log.warning(
                "eval: replies are not generated for examples with images yet "
                "(config.eval.generate_examples, config.eval.show_samples); eval reports the loss."
            )
    return pipeline.DataSource(
        train_batches=train,
        eval_batches=lambda: evaluation,
        seq_len=data.max_length,
        max_segments=documents + 1,
        tokenizer=processor.tokenizer,
        **step_images(layout),
    )
