"""What the model says during eval: greedy replies to eval prompts, exact match, logged samples."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from sft_jax.generation.sampler import generate
from sft_jax.models import CausalLM


def _text(tokenizer: Any, ids: Sequence[int], stop_token_ids: Sequence[int]) -> str:
    kept = [int(t) for t in ids if int(t) not in stop_token_ids]
    return tokenizer.decode(kept, skip_special_tokens=True).strip()


def _runs_once(ids: list[int]) -> list[int]:
    """The ids with each run of one repeated id shown once (an image's hundreds of tokens)."""
    return [t for i, t in enumerate(ids) if i == 0 or t != ids[i - 1]]


def generation_metrics(
    model: CausalLM,
    tokenizer: Any,
    prompts: Sequence[tuple[np.ndarray, np.ndarray]],
    *,
    stop_token_ids: Sequence[int],
    max_new_tokens: int,
    show: int,
    batch_size: int = 64,
    images: Sequence[tuple[dict[str, np.ndarray], Sequence[str]]] | None = None,
) -> dict[str, Any]:
    """Greedy replies to (prompt, reference reply) pairs of the eval set.

    eval/exact_match: share of replies whose text equals the reference's (special tokens such
    as the end-of-turn marker left out, surrounding whitespace ignored). eval/samples: the first
    `show` prompts with the reply and the reference, as text for the metrics file and
    TensorBoard. images (an image-text model's data): per prompt, the processor's arrays of its
    images, which the replies are generated with, and their names, which its sample shows.
    """
    replies: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = [p.tolist() for p, _ in prompts[start : start + batch_size]]
        replies += generate(
            model,
            chunk,
            max_new_tokens=max_new_tokens,
            stop_token_ids=stop_token_ids,
            pad_id=tokenizer.pad_token_id or 0,
            images=None if images is None else [a for a, _ in images[start : start + batch_size]],
        )
    said = [_text(tokenizer, r, stop_token_ids) for r in replies]
    expected = [_text(tokenizer, ref.tolist(), stop_token_ids) for _, ref in prompts]
    matches = [a == b for a, b in zip(said, expected, strict=True)]
    samples = []
    for index in range(min(show, len(prompts))):
        # Ids < 0 are virtual tokens (prompt tuning): no text.
        shown = [t for t in prompts[index][0].tolist() if t >= 0]
        prompt = tokenizer.decode(_runs_once(shown) if images else shown, skip_special_tokens=False)
        if images and images[index][1]:
            prompt = f"[images: {', '.join(images[index][1])}]\n{prompt.strip()}"
        verdict = "match" if matches[index] else "differs"
        samples.append(
            f"--- sample {index} ({verdict})\n{prompt.strip()}\n>>> model: {said[index]}\n"
            f">>> reference: {expected[index]}"
        )
    return {
        "eval/exact_match": float(np.mean(matches)) if matches else 0.0,
        "eval/generated": len(matches),
        "eval/samples": "\n".join(samples),
    }


# One sample of eval/samples as generation_metrics writes it (a reply may span lines).
_SAMPLE = re.compile(
    r"--- sample (?P<index>\d+) \((?P<verdict>match|differs)\)\n(?P<prompt>.*?)\n"
    r">>> model: (?P<reply>.*?)\n>>> reference: (?P<reference>.*?)(?=\n--- sample \d+ \(|\Z)",
    re.S,
)
SAMPLE_COLUMNS = ("index", "verdict", "prompt", "reply", "reference")


def sample_rows(text: str) -> list[list[Any]]:
    """The rows (SAMPLE_COLUMNS) of an eval/samples text: a table for the experiment trackers."""
    return [
        [int(m["index"]), m["verdict"], m["prompt"], m["reply"], m["reference"]]
        for m in _SAMPLE.finditer(text)
    ]
