"""The mask certificate of examples with images: data/certificate.py's counts and checks on the
processor's expanded text, an image's tokens and the vision markers counted as "image"."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sft_jax.data.certificate import char_labels, check_tokens
from sft_jax.data.images import open_image
from sft_jax.data.spans import Rendered, render_documents
from sft_jax.data.templates import special_texts
from sft_jax.data.tokenize import Options
from sft_jax.data.vision import encode, moved_span, vision_example


def image_checker(
    processor: Any, options: Options, root: Path
) -> Callable[[Any, dict], tuple[int, list[dict]]]:
    """certificate.check_records' `check_example` for examples with images (paths from `root`)."""
    return functools.partial(_check_example, processor, options, root)


def _check_example(
    processor: Any, options: Options, root: Path, value: Any, counts: dict
) -> tuple[int, list[dict]]:
    conversation, sources = vision_example(value, options.data_format, root)
    images = [open_image(source) for source in sources]
    tokenizer = processor.tokenizer
    specials = special_texts(tokenizer)
    documents = render_documents(
        tokenizer, conversation, options.train_on, options.train_reasoning, **options.kwargs()
    )
    problems = []
    for rendered in documents:
        count = rendered.text.count(processor.image_token)
        whole = options.train_on == "all_tokens"
        encoded = encode(processor, rendered, images[:count], whole)
        expanded = Rendered(
            expanded_text(rendered.text, encoded.replaced),
            [moved_span(span, encoded.replaced, whole) for span in rendered.spans],
            rendered.turns,
        )
        labels = expanded_labels(
            char_labels(rendered, list(conversation.messages), specials), encoded
        )
        trained = (encoded.tokens, encoded.offsets, encoded.trained)
        problems += check_tokens(tokenizer, expanded, trained, labels, counts)
    return len(documents), problems


def expanded_text(text: str, replaced: list[dict]) -> str:
    """The rendered text with each placeholder replaced as the processor replaced it."""
    pieces, last = [], 0
    for replacement in replaced:
        start, end = replacement["span"]
        pieces += [text[last:start], replacement["replacement"]]
        last = end
    return "".join([*pieces, text[last:]])


def expanded_labels(labels: list[str], encoded: Any) -> list[str]:
    """Character labels of the rendered text -> of the expanded text: each expansion, and the
    characters of every vision marker token, labelled "image"."""
    out, last = [], 0
    for replacement in encoded.replaced:
        start, end = replacement["span"]
        new_start, new_end = replacement["new_span"]
        out += labels[last:start] + ["image"] * (new_end - new_start)
        last = end
    out += labels[last:]
    for (start, end), is_vision in zip(encoded.offsets, encoded.vision, strict=True):
        if is_vision:
            out[start:end] = ["image"] * (end - start)
    return out
