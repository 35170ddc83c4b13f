"""Image-text data on the stream loader: every source of config.data (its one source, or a
mixture of sources with images and text-only sources) prepared once into the image store
(data/vision_data.py: tokens with the processor's arrays beside them, so a restart decodes no
image), its documents streamed window by window in data/stream.py's order and packed with
their images into rows of the image budget (data/vision_batches.py)."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from typing import Any

import numpy as np

from sft_jax.core.errors import ConfigError
from sft_jax.core.spec import RunSpec
from sft_jax.data import pipeline, stream, vision, vision_batches, vision_source
from sft_jax.data.mixture import Source, sources_of
from sft_jax.data.vision import VisionDocument
from sft_jax.data.vision_data import VisionData
from sft_jax.models.image_rows import ImageLayout
from sft_jax.models.io.files import resolve_model_dir

log = logging.getLogger(__name__)
FINGERPRINT = "stream-images:"  # the data position's fingerprint: the sources' documents


class VisionDocuments(stream.Documents):
    """Several prepared sources as one sequence of documents with their images; the
    (tokens, images, patches) cost of each from the stores' indexes."""

    def __init__(self, sources: list[VisionData], layout: ImageLayout):
        super().__init__([source.tokenized for source in sources])
        self.sources = sources
        self.cost = np.concatenate([vision_batches.costs(s, layout) for s in sources])

    def vision_document(self, ref: int) -> VisionDocument:
        self.read += 1
        source = int(np.searchsorted(self.bases, ref, side="right")) - 1
        return self.sources[source].document(int(ref - self.bases[source]))


class VisionStreamBatches(stream.StreamBatches):
    """StreamBatches whose rows keep each document with its images, within the row budget
    (tokens, images, patches)."""

    def __init__(self, documents: VisionDocuments, layout: ImageLayout, budget: tuple, **options):
        self.layout, self.budget = layout, budget
        super().__init__(documents, **options)

    def pack_window(self, refs: np.ndarray) -> list[list[int]]:
        cost = self.documents.cost[refs]
        return vision_batches.pack(cost, np.arange(len(refs)), self.budget, self.bound)

    def make_rows(self, rows: list[list[int]]) -> dict[str, np.ndarray]:
        read = self.documents.vision_document
        out = vision_batches.make_rows(read, rows, self.row_len, self.layout)
        self.documents.release()
        return out


def _source_data(config: RunSpec, processor: Any, source: Source, field: str) -> VisionData:
    """One source's prepared store (its own format and template options; its training
    examples the first max_examples)."""
    train = field == "train_files"
    files = source.train_files if train else source.eval_files
    split = source.data.train_split if train else source.data.eval_split
    name = f"mixture[{source.name}].{field}" if config.data.mixture else field
    limit = source.max_examples if train else 0
    return vision_source.prepared(source.data, processor, files, split, name, limit)


def _check_masks(config: RunSpec, processor: Any, sources: list[Source]) -> None:
    """pipeline.check_at_start on each source's training examples."""
    for source in sources:
        data = source.data.replace(train_files=source.train_files)
        pipeline.check_at_start(dataclasses.replace(config, data=data), processor.tokenizer)


def fingerprint(sources: list[Source], train: list[VisionData], window: int) -> str:
    """Each source's documents (vision_source.fingerprint) with its weight, and the window."""
    parts = [
        f"{vision_source.fingerprint(d)}*{s.weight}" for s, d in zip(sources, train, strict=True)
    ]
    text = "/".join([*parts, f"window={window}"])
    return FINGERPRINT + hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def _processor(config: RunSpec) -> Any:
    source = config.data.tokenizer or str(resolve_model_dir(config.model.name_or_path))
    return vision.load_processor(source, config.data.chat_template)


def prepare_stores(config: RunSpec) -> list[tuple[str, VisionData]]:
    """`python -m sft_jax.data.prepare` on image data: every source's train and eval image
    stores ("NAME", "NAME eval"), written now where missing; training (either loader) then
    reads them and opens no image."""
    processor, out = _processor(config), []
    for source in sources_of(config.data):
        out.append((source.name, _source_data(config, processor, source, "train_files")))
        if source.eval_files:
            evaluation = _source_data(config, processor, source, "eval_files")
            out.append((f"{source.name} eval", evaluation))
    return out


def open_vision_stream(config: RunSpec, feed: tuple[int, int] | None = None) -> Any:
    """The trainer's DataSource (pipeline.DataSource) of image-text data on the stream loader;
    `feed`: pipeline.row_share."""
    data = config.data
    if data.contamination != "off":
        raise ConfigError(
            f"config.data.contamination={data.contamination!r} with images: the check compares "
            "text only and is not built for image data yet; set it 'off'."
        )
    processor = _processor(config)
    layout, sources = vision_source.run_layout(config), sources_of(data)
    if data.train_on != "all_tokens":
        _check_masks(config, processor, sources)
    train = [_source_data(config, processor, s, "train_files") for s in sources]
    budget = (data.max_length, data.max_images_per_row, data.max_image_patches_per_row)
    for source, prepared in zip(sources, train, strict=True):
        field = f"config.data.mixture[{source.name}].train_files" if data.mixture else ""
        cost = vision_batches.costs(prepared, layout)
        vision_batches.check_budget(cost, budget, field or "config.data.train_files")
        summary = pipeline.summary_line(prepared.tokenized.stats)
        log.info("train %s (weight %g): %s", source.name, source.weight, summary)
    process = pipeline.row_share(feed)
    batches = VisionStreamBatches(
        VisionDocuments(train, layout),
        layout,
        budget,
        weights=[s.weight for s in sources],
        **stream.window_options(data, config.train.seed, config.train.global_batch_size, process),
        fingerprint=fingerprint(sources, train, data.stream_window),
    )
    eval_sets, first_eval = _eval_sets(
        config, processor, sources, layout, budget, batches.bound, process
    )
    return pipeline.DataSource(
        train_batches=batches,
        **pipeline.named_evals(eval_sets),
        seq_len=data.max_length,
        max_segments=batches.documents_per_row() + 1,
        tokenizer=processor.tokenizer,
        **vision_source.sample_prompts(config, processor, first_eval),
        **vision_source.step_images(layout),
    )


def _eval_sets(
    config: RunSpec,
    processor: Any,
    sources: list[Source],
    layout: ImageLayout,
    budget: tuple,
    bound: int,
    process: tuple[int, int],
) -> tuple[dict[str, list[dict[str, np.ndarray]]], VisionData | None]:
    """Each source's eval batches (rows of at most `bound` documents, as training's), and the
    first source's eval data (where eval's generated samples come from, as for text mixtures)."""
    out, first = {}, None
    for source in sources:
        if not source.eval_files:
            continue
        prepared = _source_data(config, processor, source, "eval_files")
        limit = config.data.eval_max_examples
        if 0 < limit < len(prepared):
            prepared = prepared.subset(np.arange(limit))
        first = prepared if first is None else first
        out[source.name], _ = vision_batches.eval_batches(
            prepared,
            layout,
            budget,
            global_rows=config.eval.global_batch_size,
            packing=config.data.packing,
            max_docs=bound if config.data.packing else 0,
            share=process,
        )
    return out, first
