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

from sft_jax.core.spec import DataSpec, RunSpec
from sft_jax.data import batches, images, pipeline, records, vision, vision_batches
from sft_jax.data.records import DataError
from sft_jax.data.vision_data import VisionData, prepare_vision_data
from sft_jax.models.config import from_hf_config
from sft_jax.models.image_rows import ImageBudget, ImageLayout, layout_of
from sft_jax.models.io.files import load_hf_config, resolve_model_dir

log = logging.getLogger(__name__)


def has_images(config: RunSpec) -> bool:
    """Does one of the first training examples hold an image (images.SCAN_RECORDS; of
    config.data.train_files, or of any source of config.data.mixture)?"""
    data = config.data
    if data.mixture:
        splits = [entry.get("train_split", data.train_split) for entry in data.mixture]
        files = [
            (entry["train_files"], split) for entry, split in zip(data.mixture, splits, strict=True)
        ]
    else:
        files = [(data.train_files, data.train_split)] if data.train_files else []
    return any(_first_has_images(spec, split) for spec, split in files)


def _first_has_images(spec: str, split: str) -> bool:
    sources = records.expand_sources(spec, "config.data.train_files")
    stream = records.read_records(sources[0], split, _Ignore())
    return images.any_has_images(record.value for record in stream)


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


def _processor(config: RunSpec) -> Any:
    """The model's processor (or config.data.tokenizer's folder's) with the run's template."""
    source = config.data.tokenizer or str(resolve_model_dir(config.model.name_or_path))
    return vision.load_processor(source, config.data.chat_template)


def load_vision_datasets(config: RunSpec) -> tuple[pipeline.Datasets, dict[str, int]]:
    """The train (and eval) documents of data with images as a run prepares them (the image
    tokens expanded by the processor), and the rows of one epoch of each ("train", "eval")
    under config.data's image budget: what `sft_jax.data.inspect` reports."""
    data = config.data
    layout = run_layout(config)  # a text model is refused by name
    processor = _processor(config)
    budget = (data.max_length, data.max_images_per_row, data.max_image_patches_per_row)
    stores, rows = {}, {}
    for name, files, split in (
        ("train", data.train_files, data.train_split),
        ("eval", data.eval_files, data.eval_split),
    ):
        if files:
            stores[name] = prepared(data, processor, files, split, f"{name}_files")
            cost = vision_batches.costs(stores[name], layout)
            vision_batches.check_budget(cost, budget, f"config.data.{name}_files")
            order = np.arange(len(cost))
            packed = vision_batches.pack(cost, order, budget, data.max_documents_per_row)
            rows[name] = len(packed) if data.packing else len(cost)
    train, evaluation = stores["train"], stores.get("eval")
    tokenized = evaluation.tokenized if evaluation is not None else None
    datasets = pipeline.Datasets(
        train.tokenized, tokenized, processor.tokenizer, fingerprint(train)
    )
    return datasets, rows


def prepared(
    data: DataSpec, processor: Any, files: str, split: str, field: str, limit: int = 0
) -> VisionData:
    """The image store of `files` (config.data.<field>: files, globs) with data's options, of
    the first `limit` examples (0: all)."""
    sources = records.expand_sources(files, f"config.data.{field}")
    options = pipeline.tokenize_options(data, sources, split)
    cache = data.cache_dir if data.cache_dir not in ("", "none") else ""
    store = Path(cache or pipeline.default_cache_dir()).expanduser() / "images"
    return prepare_vision_data(processor, sources, split, options, store, limit)


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
    layout = run_layout(config)  # a text model is refused by name before its processor
    processor = _processor(config)
    if data.train_on != "all_tokens":
        pipeline.check_at_start(config, processor.tokenizer)
    train_data = prepared(data, processor, data.train_files, data.train_split, "train_files")
    eval_data = None
    if data.eval_files:
        eval_data = prepared(data, processor, data.eval_files, data.eval_split, "eval_files")
    elif data.eval_fraction > 0:  # held out as the text loader does; each keeps its images
        train_ids, eval_ids = pipeline.held_out(
            len(train_data), data.eval_fraction, config.train.seed
        )
        train_data, eval_data = train_data.subset(train_ids), train_data.subset(eval_ids)
    if eval_data is not None and 0 < data.eval_max_examples < len(eval_data):
        eval_data = eval_data.subset(np.arange(data.eval_max_examples))
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
    if eval_data is not None:
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
    return pipeline.DataSource(
        train_batches=train,
        eval_batches=lambda: evaluation,
        seq_len=data.max_length,
        max_segments=documents + 1,
        tokenizer=processor.tokenizer,
        **sample_prompts(config, processor, eval_data),
        **step_images(layout),
    )


def sample_prompts(config: RunSpec, processor: Any, eval_data: VisionData | None) -> dict:
    """DataSource's eval_prompts and eval_images: the first eval documents whose replies eval
    generates (with their images and their names), as many as config.eval asks for."""
    count = max(config.eval.generate_examples, config.eval.show_samples)
    if eval_data is None or count == 0:
        return {}
    image_ids = [i for i in processor.image_token_ids if i is not None]
    prompts = eval_data.eval_prompts(count, image_ids)
    return {
        "eval_prompts": [(p.prompt, p.reference) for p in prompts],
        "eval_images": [(p.images, p.labels) for p in prompts],
    }
