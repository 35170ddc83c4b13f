"""Chat examples with images -> tokens, trained flags and the processor's per-image arrays.

The model's own transformers processor does the vision preprocessing: its chat template renders
the conversation with one placeholder per image (Gemma 3 `<start_of_image>`, Qwen2.5-VL
`<|vision_start|><|image_pad|><|vision_end|>`), the processor expands each placeholder to the
image's tokens and returns the pixel arrays. The trained spans are those of text examples
(`spans.render_documents`, verified there), moved past each expansion:

  rendered  "...user\\n<start_of_image>What?<end_of_turn>\\n<start_of_turn>model\\nA cat.<eot>"
  expanded  "...user\\n\\n\\n<start_of_image><image_soft_token>x256<end_of_image>\\n\\nWhat?..."
  trained   [0 ... 0 (prompt, the image's tokens)  | 1 1 1 1 (A cat . <end_of_turn>)]

Image tokens and the vision markers around them never train. One document (`VisionDocument`):
tokens int32 [T], trained bool [T], image_tokens int32 [images] (the tokens of each image) and
`images`, the processor's arrays by name with the images on axis 0 (Gemma 3: pixel_values
float32 [images, 3, S, S]; Qwen2.5-VL: pixel_values float32 [patches, C*t*p*p] and
image_grid_thw int64 [images, 3]).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from sft_jax.data import images as image_files
from sft_jax.data.formats import Conversation, normalize
from sft_jax.data.messages import BadExample
from sft_jax.data.processor_parts import processor_from_parts
from sft_jax.data.records import DataError, Record
from sft_jax.data.spans import Rendered, render_documents
from sft_jax.data.templates import TemplateError, render, resolve_chat_template
from sft_jax.data.tokenize import (
    Options,
    _dropped,
    _note_empty_reply,
    _overlaps,
    empty_stats,
    note_dropped_content,
)

# The processor's outputs about the text (rebuilt from the tokens); the rest are image arrays.
TEXT_FIELDS = (
    "input_ids",
    "attention_mask",
    "token_type_ids",
    "mm_token_type_ids",
    "offset_mapping",
    "text_replacement_offsets",
)
# Special tokens of vision models that mark images: <start_of_image>, <|vision_start|>, ...
_VISION_SPECIAL = re.compile(r"image|vision", re.IGNORECASE)


@dataclasses.dataclass
class VisionDocument:
    """One document: tokens, trained flags, each image's token count and its arrays."""

    tokens: np.ndarray  # int32 [T]
    trained: np.ndarray  # bool [T]
    image_tokens: np.ndarray  # int32 [images]
    images: dict[str, np.ndarray]  # the processor's per-image arrays, images on axis 0
    labels: tuple[str, ...] = ()  # each image's name for logged samples (ImageSource.name)


def load_processor(source: str | Path, chat_template: str = "") -> Any:
    """The model folder's transformers processor (never running code from the folder), its
    tokenizer rendering with the processor's chat template or config.data.chat_template."""
    import transformers

    try:
        processor = transformers.AutoProcessor.from_pretrained(source, trust_remote_code=False)
    except Exception as e:
        try:  # e.g. no torchvision for a video processor: the parts images need
            processor = processor_from_parts(source)
        except Exception as parts:
            raise DataError(
                f"{source}: no processor could be loaded (AutoProcessor: {type(e).__name__}: "
                f"{str(e)[:200]}; from its parts: {type(parts).__name__}: {str(parts)[:200]}). "
                "Point the model at a folder with the vision model's processor files "
                "(preprocessor_config.json, tokenizer and chat template)."
            ) from e
    if getattr(processor, "image_processor", None) is None:
        raise DataError(
            f"{source}: the processor {type(processor).__name__} has no image processor, so "
            "examples with images cannot be prepared; use a vision model's folder."
        )
    tokenizer = processor.tokenizer
    if chat_template:
        tokenizer.chat_template = resolve_chat_template(chat_template)
    else:
        tokenizer.chat_template = processor.chat_template or tokenizer.chat_template
    return processor


def vision_example(value: Any, data_format: str, root: Path) -> tuple[Conversation, list]:
    """An example of TRL's vision format (or with image_url parts) -> its conversation, image
    parts as {"type": "image"} in user and system messages, and its image sources."""
    if data_format != "messages" or not isinstance(value, dict):
        if image_files.has_images(value):
            raise DataError(
                f"examples with images are read in the 'messages' format (TRL's vision "
                f"format), not {data_format!r}; set config.data.format='messages'."
            )
        return normalize(value, data_format), []  # text only (or names the problem)
    messages, sources = image_files.image_parts(value.get("messages"), value.get("images"), root)
    if not sources:
        return normalize(value, data_format), []
    text_only = [_without_images(m) for m in messages]
    conversation = normalize({**value, "messages": text_only}, data_format)
    turns = list(conversation.messages)
    for index, message in enumerate(messages):
        if text_only[index] is message:
            continue
        if turns[index]["role"] == "assistant":
            raise BadExample(
                f"messages[{index}] is an assistant message with an image; images go in "
                "user or system messages (the model reads them, never writes them)",
                "image_in_reply",
            )
        turns[index] = {**turns[index], "content": message["content"]}
    return dataclasses.replace(conversation, messages=tuple(turns)), sources


def _without_images(message: Any) -> Any:
    """The message with its image parts left out (the same object when it has none)."""
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, list) or image_files.IMAGE_PART not in content:
        return message
    return {**message, "content": [p for p in content if p != image_files.IMAGE_PART]}


def tokenize_vision_documents(
    processor: Any, conversation: Conversation, images: list, options: Options
) -> tuple[list[VisionDocument], dict[str, int]]:
    """The documents of one conversation and the notes tokenize.tokenize_documents gives."""
    tokenizer = processor.tokenizer
    kwargs = {**options.kwargs(), **conversation.template_kwargs}
    tools = list(conversation.tools) if conversation.tools else None
    full = render(tokenizer, list(conversation.messages), False, tools, kwargs)
    if full.count(processor.image_token) != len(images):
        raise BadExample(
            f"the chat template renders {full.count(processor.image_token)} image "
            f"placeholders ({processor.image_token}) for {len(images)} images",
            "template_drops_images",
        )
    notes = {"truncated": 0, "duplicate_bos_removed": 0, "template_dropped_content": 0}
    rendered = render_documents(
        tokenizer, conversation, options.train_on, options.train_reasoning, **options.kwargs()
    )
    notes["template_dropped_content"] = sum(len(r.dropped_content) for r in rendered)
    documents = []
    for document in rendered:
        count = document.text.count(processor.image_token)  # a prefix holds the first ones
        out = _document(processor, document, images[:count], options, notes)
        if out.trained[1:].any():  # token 0 is never a target
            documents.append(out)
    if not documents:
        reason = "no_target_tokens_after_truncation" if notes["truncated"] else "no_target_tokens"
        raise BadExample("no trained tokens left", reason)
    return documents, notes


def process(processor: Any, text: str, images: list) -> dict[str, Any]:
    """The processor's output for one document, with the placeholder replacements and each
    token's characters in the expanded text."""
    try:
        out = processor(
            text=[text],
            images=[images] if images else None,
            add_special_tokens=False,
            return_offsets_mapping=True,
            return_text_replacement_offsets=True,
        )
    except (ValueError, TypeError, OSError) as e:  # e.g. an image too small to resize
        raise BadExample(
            f"the processor refused the example's images ({type(e).__name__}: {str(e)[:200]})",
            "bad_image",
        ) from None
    return dict(out)


@dataclasses.dataclass
class Encoded:
    """A rendered document as the processor encodes it (before any truncation)."""

    tokens: np.ndarray  # int32 [T]
    offsets: list[tuple[int, int]]  # each token's characters in the expanded text
    replaced: list[dict]  # the processor's placeholder replacements (span, new_span, ...)
    trained: np.ndarray  # bool [T]
    vision: np.ndarray  # bool [T]: image tokens and vision markers
    arrays: dict[str, np.ndarray]  # the processor's per-image arrays


def encode(processor: Any, rendered: Rendered, images: list, whole: bool = False) -> Encoded:
    """Tokens of the expanded text, trained where the moved spans are, never an image's.
    whole: the spans are data.train_on='all_tokens' (moved_span)."""
    out = process(processor, rendered.text, images)
    tokens = np.asarray(out["input_ids"][0], np.int32)
    offsets = [tuple(o) for o in out["offset_mapping"][0]]
    replaced = out["text_replacement_offsets"][0] if out.get("text_replacement_offsets") else []
    spans = [moved_span(span, replaced, whole) for span in rendered.spans]
    vision = vision_tokens(processor, tokens, offsets, replaced)
    trained = _overlaps(offsets, spans) & ~vision
    arrays = {k: np.asarray(v) for k, v in out.items() if k not in TEXT_FIELDS}
    return Encoded(tokens, offsets, replaced, trained, vision, arrays)


def _document(
    processor: Any, rendered: Rendered, images: list, options: Options, notes: dict
) -> VisionDocument:
    encoded = encode(processor, rendered, images, options.train_on == "all_tokens")
    tokens, trained, vision = encoded.tokens, encoded.trained, encoded.vision
    image_ids = [i for i in processor.image_token_ids if i is not None]
    counts = [
        int(np.sum(np.isin(tokens, image_ids) & _inside(encoded.offsets, r["new_span"])))
        for r in encoded.replaced
    ]
    if len(tokens) > options.max_length:
        last_image = int(np.flatnonzero(vision)[-1]) if vision.any() else -1
        if options.overlong == "drop" or last_image >= options.max_length:
            raise BadExample(
                f"{len(tokens)} tokens, over config.data.max_length={options.max_length}"
                + (" (an image would be cut)" if last_image >= options.max_length else ""),
                "too_long",
            )
        tokens, trained = tokens[: options.max_length], trained[: options.max_length]
        notes["truncated"] = 1
    return VisionDocument(tokens, trained, np.asarray(counts, np.int32), encoded.arrays)


def moved_span(span: tuple[int, int], replaced: list[dict], whole: bool = False) -> tuple[int, int]:
    """A span of the rendered text -> the same characters in the expanded text. whole:
    data.train_on='all_tokens', whose span holds the images too (their tokens are left
    untrained by `encode` all the same); otherwise an image inside a trained span is refused."""
    start, end = span
    shift = grow = 0
    for replacement in replaced:
        (old_start, old_end), (new_start, new_end) = replacement["span"], replacement["new_span"]
        change = (new_end - new_start) - (old_end - old_start)
        if old_end <= start:
            shift += change
        elif whole and start <= old_start and old_end <= end:
            grow += change
        elif old_start < end:
            raise BadExample("an image placeholder lies in a trained reply", "image_in_reply")
    return start + shift, end + shift + grow


def _inside(offsets: list, span: tuple[int, int]) -> np.ndarray:
    starts = np.array([a for a, _ in offsets], np.int64)
    return (starts >= span[0]) & (starts < span[1])


def vision_tokens(
    processor: Any, tokens: np.ndarray, offsets: list, replaced: list[dict]
) -> np.ndarray:
    """Per token: an image token or a vision marker (the expansions the processor made, and
    special tokens named for images or vision: <start_of_image>, <|vision_end|>, ...)."""
    vision = np.isin(tokens, _vision_marks(processor.tokenizer))
    for replacement in replaced:
        vision |= _inside(offsets, replacement["new_span"])
    return vision


@functools.lru_cache(maxsize=8)
def _vision_marks(tokenizer: Any) -> list[int]:
    """The ids of the tokenizer's special tokens named for images or vision."""
    texts = tokenizer.all_special_tokens + [
        t.content for t in tokenizer.added_tokens_decoder.values() if t.special
    ]
    return sorted({tokenizer.convert_tokens_to_ids(t) for t in texts if _VISION_SPECIAL.search(t)})


def tokenize_vision_records(
    processor: Any, records: Iterable[Record], options: Options, root: Path
) -> tuple[list[VisionDocument], dict[str, Any]]:
    """Every record's documents and the stats (drop reasons counted as for text data: a bad
    example stops with its file and line, or is counted with skip_bad_examples)."""
    documents, stats, bad = [], empty_stats(), []
    stats["images"] = 0
    for record in records:
        stats["examples_read"] += 1
        try:
            conversation, sources = vision_example(record.value, options.data_format, root)
            _note_empty_reply(conversation, record.where, options, stats)
            images = [image_files.open_image(source) for source in sources]
            docs, notes = tokenize_vision_documents(processor, conversation, images, options)
        except BadExample as e:
            bad.append((record.where, str(e), e.reason))
            continue
        except TemplateError as e:
            raise TemplateError(f"{record.where}: {e}") from None
        for document in docs:  # a document holds the first images of its conversation
            names = sources[: len(document.image_tokens)]
            document.labels = tuple(source.name(record.where) for source in names)
        documents.extend(docs)
        stats["images"] += len(sources)
        if len(docs) > 1:
            stats["expanded_examples"] += 1
            stats["expanded_documents"] += len(docs)
        stats["truncated"] += notes["truncated"]
        note_dropped_content(notes["template_dropped_content"], record.where, stats)
    stats["dropped"] = _dropped(bad, options)
    stats["examples_kept"] = stats["examples_read"] - sum(stats["dropped"].values())
    stats["documents"] = len(documents)
    stats["tokens"] = sum(len(d.tokens) for d in documents)
    stats["trainable_tokens"] = sum(int(d.trained[1:].sum()) for d in documents)
    return documents, stats
