"""The mask certificate: what trains, per role and field, checked example by example.

For every document an example renders to, each token gets a category from the characters it
holds: system, user, assistant (reply text), reasoning, tool_call, tool_result, image (an
image's tokens and the vision markers around them, data/vision.py) or glue (the template's own
text: headers, end-of-turn tokens, tool schemas). The report counts trained and
untrained tokens per category and lists violations, each naming the example and the span:

  - a trained span whose tokens do not cover exactly its characters (a token straddles the
    boundary between the prompt and the reply; tokenization cuts the text there, see
    `sft_jax.data.boundaries`), or whose decoded tokens differ from its text;
  - a trained token holding system, user or tool-result text;
  - a conversation the template cannot render with verified spans (the problem, as training
    would report it).
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from sft_jax.data.boundaries import encode
from sft_jax.data.formats import BadExample, Completion, normalize
from sft_jax.data.messages import reasoning_and_answer
from sft_jax.data.records import Record
from sft_jax.data.spans import Rendered, render_documents
from sft_jax.data.templates import TemplateError, completion_text, special_texts
from sft_jax.data.tokenize import Options, _overlaps

CATEGORIES = (
    "system",
    "user",
    "assistant",
    "reasoning",
    "tool_call",
    "tool_result",
    "image",
    "glue",
)
NEVER_TRAINED = ("system", "user", "tool_result", "image")
_ROLE_CATEGORY = {"system": "system", "user": "user", "tool": "tool_result"}


def check_records(
    tokenizer: Any,
    records: Iterable[Record],
    options: Options,
    check_example: Callable[[Any, dict], tuple[int, list[dict]]] | None = None,
) -> dict[str, Any]:
    """The certificate of `records`: per-category token counts and violations. Examples with
    images are checked by data/vision_check.py's `check_example(value, counts)`, which gives
    the documents an example renders to and their violations, as `_check_example` does."""
    check_example = check_example or functools.partial(_check_example, tokenizer, options)
    counts = {c: {"trained": 0, "untrained": 0} for c in CATEGORIES}
    report: dict[str, Any] = {"examples": 0, "documents": 0, "skipped": {}, "violations": []}
    skipped: collections.Counter[str] = collections.Counter()
    for record in records:
        report["examples"] += 1
        try:
            documents, problems = check_example(record.value, counts)
        except BadExample as e:  # reported by tokenization as a bad example
            skipped[e.reason] += 1
            continue
        except TemplateError as e:
            report["violations"].append({"where": record.where, "span": None, "problem": str(e)})
            continue
        report["documents"] += documents
        report["violations"] += [{"where": record.where, **problem} for problem in problems]
    report["skipped"] = dict(sorted(skipped.items()))
    report["categories"] = counts
    return report


def merged(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """The certificate of several parts of the data (e.g. one per source), added up."""
    total: dict[str, Any] = {"examples": 0, "documents": 0, "skipped": {}, "violations": []}
    total["categories"] = {c: {"trained": 0, "untrained": 0} for c in CATEGORIES}
    for report in reports:
        total["examples"] += report["examples"]
        total["documents"] += report["documents"]
        total["violations"] += report["violations"]
        for reason, count in report["skipped"].items():
            total["skipped"][reason] = total["skipped"].get(reason, 0) + count
        for category, count in report["categories"].items():
            for kind in ("trained", "untrained"):
                total["categories"][category][kind] += count[kind]
    total["skipped"] = dict(sorted(total["skipped"].items()))
    return total


def _check_example(
    tokenizer: Any, options: Options, value: Any, counts: dict
) -> tuple[int, list[dict]]:
    documents = _documents(tokenizer, value, options)
    problems = [
        problem
        for rendered, messages in documents
        for problem in _check_document(tokenizer, rendered, messages, counts)
    ]
    return len(documents), problems


def _documents(tokenizer: Any, value: Any, options: Options) -> list[tuple[Rendered, list]]:
    example = normalize(value, options.data_format)
    if isinstance(example, Completion):
        text, spans = completion_text(tokenizer, example.prompt, example.completion)
        messages = [
            {"role": "user", "content": example.prompt},
            {"role": "assistant", "content": example.completion},
        ]
        return [(Rendered(text, spans, [1]), messages)]
    rendered = render_documents(
        tokenizer, example, options.train_on, options.train_reasoning, **options.kwargs()
    )
    return [(r, list(example.messages)) for r in rendered]


def _check_document(
    tokenizer: Any, rendered: Rendered, messages: list[dict], counts: dict
) -> list[dict[str, Any]]:
    text = rendered.text
    ids, offsets = encode(tokenizer, text, rendered.spans)
    tokens = np.asarray(ids)
    trained = _overlaps(offsets, rendered.spans)
    labels = char_labels(rendered, messages, special_texts(tokenizer))
    return check_tokens(tokenizer, rendered, (tokens, offsets, trained), labels, counts)


def check_tokens(
    tokenizer: Any, rendered: Rendered, encoded: tuple, labels: list[str], counts: dict
) -> list[dict[str, Any]]:
    """Counts a document's tokens (ids, character offsets, trained flags) per category of
    their characters' `labels`, and returns its violations. `rendered` holds the text the
    offsets point into and its trained spans."""
    tokens, offsets, trained = encoded
    text = rendered.text
    problems = []
    for index, (start, end) in enumerate(offsets):
        chars = [c for c in labels[start:end] if c != "glue"] or ["glue"]
        category = chars[0]
        counts[category]["trained" if trained[index] else "untrained"] += 1
        if trained[index] and category in NEVER_TRAINED:
            problems.append({"span": [start, end], "problem": f"a {category} token trains"})
    for span in rendered.spans:
        problem = _span_problem(tokenizer, tokens, offsets, text, span)
        if problem:
            problems.append({"span": list(span), "problem": problem})
    return problems


def _span_problem(
    tokenizer: Any, tokens: np.ndarray, offsets: list, text: str, span: tuple[int, int]
) -> str | None:
    inside = _overlaps(offsets, [span])
    if not inside.any():
        return f"no token covers the span {text[span[0] : span[1]]!r}"
    first, last = np.flatnonzero(inside)[[0, -1]]
    covered = (offsets[first][0], offsets[last][1])
    if covered != tuple(span):
        return (
            f"a token straddles the span boundary: tokens cover {text[covered[0] : covered[1]]!r}"
            f", the span is {text[span[0] : span[1]]!r}"
        )
    decoded = _decoded_in_context(tokenizer, tokens, first, last + 1)
    if decoded is None:
        return f"decoding the trained tokens of {text[span[0] : span[1]]!r} changes the text before"
    if decoded != text[span[0] : span[1]]:
        return f"the trained tokens decode to {decoded!r}, the span is {text[span[0] : span[1]]!r}"
    return None


def _decoded_in_context(tokenizer: Any, tokens: np.ndarray, start: int, stop: int) -> str | None:
    """The text tokens[start:stop] add to the decoding of the tokens before them.

    A slice decoded on its own is not its text: SentencePiece-style decoders (Metaspace, or a
    Strip of one leading space: Llama 2, Mistral, TinyLlama) drop the leading space of the
    first token decoded, so a reply ' 42' would decode to '42'. Decoding the prefix through the
    slice and taking away the prefix gives what the slice reads as in its document. A slice at
    the very start gets a special token in front, so the decoder's strip falls on that token.
    None where the prefix's text changes when the slice follows it (nothing to compare)."""
    context = tokens[:start].tolist()
    if not context and tokenizer.all_special_ids:
        context = [tokenizer.all_special_ids[0]]
    before = tokenizer.decode(context, clean_up_tokenization_spaces=False)
    through = tokenizer.decode(
        context + tokens[start:stop].tolist(), clean_up_tokenization_spaces=False
    )
    return through[len(before) :] if through.startswith(before) else None


def char_labels(rendered: Rendered, messages: list[dict], specials: list[str]) -> list[str]:
    """The category of each character: message fields found in order, the rest glue. In a
    trained reply that calls tools, its text after the reply text (up to the end-of-turn
    token) is the calls as the template writes them."""
    text = rendered.text
    labels = ["glue"] * len(text)
    spans = dict(zip(rendered.turns, rendered.spans, strict=True))
    cursor = 0
    for index, message in enumerate(messages):
        start, end = spans.get(index, (cursor, len(text)))
        role = _ROLE_CATEGORY.get(message["role"], "assistant")
        reasoning, answer = (
            reasoning_and_answer(message) if role == "assistant" else ("", message["content"])
        )
        fields = [("reasoning", reasoning)] + [(role, text) for text in _texts(answer)]
        fields += [("tool_call", c["function"]["name"]) for c in message.get("tool_calls", ())]
        position = start
        for category, value in fields:
            value = value.strip()
            found = text.find(value, position, end) if value else -1
            if found >= 0:
                labels[found : found + len(value)] = [category] * len(value)
                position = found + len(value)
        if index in spans and message.get("tool_calls"):
            calls_from = max(
                start,
                *(i + 1 for i in range(start, end) if labels[i] in ("assistant", "reasoning")),
                0,
            )
            eot = next((t for t in specials if text[:end].endswith(t)), "")
            for i in range(calls_from, end - len(eot)):
                labels[i] = "tool_call"
        cursor = end if index in spans else max(cursor, position)
    return labels


def _texts(content: str | list) -> list[str]:
    """The texts of message content: a string, or the text parts of a list (images left out)."""
    if isinstance(content, str):
        return [content]
    return [part["text"] for part in content if part.get("type") == "text"]


def table(report: dict[str, Any]) -> str:
    """The per-category counts as text lines."""
    lines = [f"{'tokens':<12}{'trained':>10}{'untrained':>11}"]
    for category, count in report["categories"].items():
        lines.append(f"{category:<12}{count['trained']:>10}{count['untrained']:>11}")
    lines.append(
        f"{report['examples']} examples, {report['documents']} documents, skipped "
        f"{report['skipped'] or 'none'}, {len(report['violations'])} violations"
    )
    return "\n".join(lines)
