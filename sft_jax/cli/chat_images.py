"""`chat --image=PATH`: the images go into the first user message of the conversation, which the
export's own processor (tokenizer, chat template and image processor: data/vision.py) renders
and expands into the prompt's tokens and image arrays for the sampler."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from sft_jax.core.errors import UsageError
from sft_jax.data.vision import TEXT_FIELDS, load_processor
from sft_jax.generation.sampler import reply
from sft_jax.models import CausalLM


def open_images(paths: list[str]) -> list[Any]:
    """The --image files as RGB PIL images, or a UsageError naming the one that fails."""
    import PIL.Image

    images = []
    for path in paths:
        try:
            with PIL.Image.open(Path(path).expanduser()) as image:
                images.append(image.convert("RGB"))
        except (OSError, ValueError) as e:
            raise UsageError(f"--image={path}: cannot be read as an image ({e}).") from None
    return images


def image_processor(model: CausalLM, model_dir: str, raw: bool) -> Any:
    """The export's processor for --image, refused for a text model or with --raw."""
    if model.config.vision is None:
        raise UsageError(
            f"--image: {model_dir} holds a text model ({model.config.model_type}), which reads "
            "no images; use an image-text model's export (Gemma 3, Qwen2.5-VL) or drop --image."
        )
    if raw:
        raise UsageError("--image needs the chat template: drop --raw.")
    return load_processor(model_dir)


def with_images(history: list[dict[str, Any]], count: int) -> list[dict[str, Any]]:
    """The conversation with `count` image parts before the first user message's text."""
    turns = list(history)
    first = next(i for i, turn in enumerate(turns) if turn["role"] == "user")
    text = {"type": "text", "text": turns[first]["content"]}
    turns[first] = {"role": "user", "content": [*[{"type": "image"}] * count, text]}
    return turns


def image_prompt(
    processor: Any, history: list[dict[str, Any]], images: list[Any]
) -> tuple[list[int], dict[str, np.ndarray]]:
    """(prompt ids with each image's tokens, the processor's image arrays) of the conversation
    with the assistant's turn opened."""
    text = processor.tokenizer.apply_chat_template(
        with_images(history, len(images)), add_generation_prompt=True, tokenize=False
    )
    out = processor(text=[text], images=[images], add_special_tokens=False)
    arrays = {k: np.asarray(v) for k, v in out.items() if k not in TEXT_FIELDS}
    return list(np.asarray(out["input_ids"][0]).tolist()), arrays


def respond_with_images(
    model: CausalLM,
    processor: Any,
    images: list[Any],
    history: list[dict[str, Any]],
    text: str,
    options: dict[str, Any],
) -> str:
    """The reply to `text`, the images in the first user message; both turns are appended to
    `history` (plain text: the images are added at each rendering)."""
    history.append({"role": "user", "content": text})
    prompt_ids, arrays = image_prompt(processor, history, images)
    answer = reply(model, processor.tokenizer, prompt_ids, images=arrays, **options)
    history.append({"role": "assistant", "content": answer})
    return answer
