"""Tokens of a rendered document that never straddle the edge of a trained span.

A document's text tokenizes as a whole, except where a token would cover both sides of a span
edge: Qwen3.5's generation prompt ends "<think>\\n" and the reply begins "\\n</think>", which
as one text tokenize as "<think>", "\\n\\n", "</think>", a token half prompt, half reply. There
the text is cut at the edge and each side tokenized on its own:

  prompt | reply        "<|im_start|>assistant\\n<think>\\n" | "\\n</think>\\n\\nHi<|im_end|>"
  tokens                 ... "<think>" "\\n"                 | "\\n" "</think>" "\\n\\n" "Hi" ...

so the prompt tokens are those the model reads at inference (the prompt tokenized alone) and
the trained tokens are exactly the reply. Documents without such a token are unchanged.
"""

from __future__ import annotations

import bisect
from typing import Any


def encode(
    tokenizer: Any, text: str, spans: list[tuple[int, int]]
) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and (start, end) character offsets of `text`, cut at each span edge that a
    token of the whole text would straddle."""
    ids, offsets = _encode(tokenizer, text, 0)
    cuts = _straddled(offsets, sorted({edge for span in spans for edge in span}))
    if not cuts:
        return ids, offsets
    ids, offsets = [], []
    for start, end in zip([0, *cuts], [*cuts, len(text)], strict=True):
        piece_ids, piece_offsets = _encode(tokenizer, text[start:end], start)
        ids.extend(piece_ids)
        offsets.extend(piece_offsets)
    return ids, offsets


def _straddled(offsets: list[tuple[int, int]], edges: list[int]) -> list[int]:
    """The edges that fall strictly inside a token (offsets are in text order)."""
    starts = [a for a, _ in offsets]
    cuts = []
    for edge in edges:
        index = bisect.bisect_right(starts, edge) - 1
        if index >= 0 and offsets[index][0] < edge < offsets[index][1]:
            cuts.append(edge)
    return cuts


def _encode(tokenizer: Any, text: str, shift: int) -> tuple[list[int], list[tuple[int, int]]]:
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = [(a + shift, b + shift) for a, b in encoded["offset_mapping"]]
    return list(encoded["input_ids"]), offsets
