"""Examples -> token ids and a per-token "is trained" flag; run once, in parallel, cached on disk.

A tokenized document keeps its tokens unshifted; `trained[t]` says that token t is part of a
trained span (an assistant reply and its end-of-turn token). The shift to next-token targets
happens once, in `sft_jax.data.batches`. The text is tokenized with add_special_tokens=False:
the chat template already holds BOS, so it is never doubled.

Span boundaries: a token is trained when at least one of its characters lies in a trained span
(a zero-width token when its position does). A token of the whole text that would hold both the
last character of the generation prompt and the first of the reply (Qwen3.5's "<think>\n" +
"\n</think>") is never made: the text is cut at that edge and each side tokenized alone
(`sft_jax.data.boundaries`), so the prompt's tokens are those read at inference and the trained
tokens exactly the reply. `inspect --check` still reports any straddling token as a violation.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import multiprocessing
import os
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from sft_jax.data.boundaries import encode
from sft_jax.data.formats import BadExample, Completion, Conversation, normalize
from sft_jax.data.records import DataError, Record
from sft_jax.data.spans import render_documents
from sft_jax.data.stats import add as stats_add
from sft_jax.data.templates import TemplateError, completion_text

log = logging.getLogger(__name__)
# An assistant reply with no text (nor reasoning or tool calls) trains only its end-of-turn
# token: "warn" keeps such examples and reports their count and the first one, "skip" drops
# them (counted), "error" stops at the first one.
EMPTY_REPLIES = ("warn", "skip", "error")
# What an example longer than max_length becomes: its first max_length tokens (counted as
# truncated), or nothing (counted as a drop, reason "too_long"). Never split into pieces.
OVERLONG = ("truncate", "drop")
# The modules whose code decides spans and tokens: their text is part of the cache key.
SPAN_CODE = (
    "messages.py",
    "formats.py",
    "templates.py",
    "spans.py",
    "boundaries.py",
    "tokenize.py",
)
_CHUNK = 256  # examples per task handed to a worker process


@dataclasses.dataclass(frozen=True)
class Options:
    """What decides how an example becomes tokens (part of the cache key)."""

    data_format: str  # one of formats.FORMATS, already resolved from "auto"
    train_on: str  # templates.TRAIN_ON
    max_length: int  # tokens kept per example; the rest is cut off
    skip_bad: bool  # count and skip malformed examples instead of stopping
    train_reasoning: str = "all"  # spans.TRAIN_REASONING
    template_kwargs: str = ""  # JSON object of chat-template keyword arguments ("" = none)
    empty_replies: str = "warn"  # EMPTY_REPLIES: what an empty assistant reply does
    overlong: str = "truncate"  # OVERLONG: what an example over max_length becomes

    def kwargs(self) -> dict[str, Any]:
        return json.loads(self.template_kwargs) if self.template_kwargs else {}


@dataclasses.dataclass
class Tokenized:
    """Documents stored flat: document i is tokens[offsets[i]:offsets[i + 1]]."""

    tokens: np.ndarray  # int32 [total]
    trained: np.ndarray  # bool [total]
    offsets: np.ndarray  # int64 [documents + 1]
    stats: dict[str, Any]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def document(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        span = slice(self.offsets[index], self.offsets[index + 1])
        return self.tokens[span], self.trained[span]

    def last_reply(self, index: int) -> tuple[np.ndarray, np.ndarray] | None:
        """(prompt, reply) tokens of a document's last trained span, for generation in eval.

        The prompt ends with the generation prompt (e.g. `<|im_start|>assistant\\n`) and the
        reply ends with its end-of-turn token; None when nothing precedes the span.
        """
        tokens, trained = self.document(index)
        starts = np.flatnonzero(trained & ~np.concatenate([[False], trained[:-1]]))
        if len(starts) == 0 or starts[-1] == 0:
            return None
        start = int(starts[-1])
        end = start + int(np.argmin(np.append(trained[start:], False)))
        return tokens[:start], tokens[start:end]

    def with_prefix(self, prefix: np.ndarray) -> Tokenized:
        """Every document with the untrained tokens `prefix` first (prompt tuning's virtual
        tokens): [t0 t1] -> [p0 p1 t0 t1], trained [0 0 m0 m1]."""
        count, extra = len(self), len(prefix)
        offsets = self.offsets + extra * np.arange(count + 1)
        tokens = np.empty(offsets[-1], np.int32)
        trained = np.zeros(offsets[-1], np.bool_)
        kept = np.arange(len(self.tokens)) + extra * np.repeat(
            np.arange(1, count + 1), self.lengths()
        )
        tokens[kept], trained[kept] = self.tokens, self.trained
        tokens[(offsets[:-1, None] + np.arange(extra)[None]).ravel()] = np.tile(prefix, count)
        return Tokenized(tokens, trained, offsets, self.stats)

    def subset(self, indices: Sequence[int]) -> Tokenized:
        docs = [self.document(i) for i in indices]
        return from_documents(docs, dict(self.stats))


def from_documents(docs: list[tuple[np.ndarray, np.ndarray]], stats: dict) -> Tokenized:
    lengths = np.array([len(t) for t, _ in docs], np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    cat = (
        (lambda xs, dtype: np.concatenate(xs).astype(dtype))
        if docs
        else (lambda xs, dtype: np.zeros(0, dtype))
    )
    return Tokenized(
        cat([t for t, _ in docs], np.int32), cat([m for _, m in docs], np.bool_), offsets, stats
    )


def empty_stats() -> dict[str, Any]:
    return {
        "examples_read": 0,
        "examples_kept": 0,
        "documents": 0,
        "dropped": {},
        "truncated": 0,
        "empty_replies": 0,
        "first_empty_reply": "",  # where the first one was read
        # Trained assistant turns whose text content the chat template leaves out (Llama 3.1
        # renders a turn with text and a tool call as the call alone): trained as rendered.
        "template_dropped_content": 0,
        "first_template_dropped_content": "",  # where the first one was read
        "tokens": 0,
        "trainable_tokens": 0,
        "duplicate_bos_removed": 0,
        # Conversations rendered as several documents because the template rewrites history
        # (one per trained turn it renders differently later), and the documents they gave.
        "expanded_examples": 0,
        "expanded_documents": 0,
    }


def _overlaps(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> np.ndarray:
    """Per token: does any of its characters lie in a span? (Zero-width tokens: their position.)

    The straddling rule of the module docstring: characters [a, b) and span [s, e) overlap
    when a < e and b > s, e.g. offsets [(0, 3), (3, 7), (7, 9)] and span (5, 8) -> [0, 1, 1].
    """
    starts = np.array([a for a, _ in offsets], np.int64)
    ends = np.array([max(b, a + 1) for a, b in offsets], np.int64)
    trained = np.zeros(len(offsets), bool)
    for begin, end in spans:
        trained |= (starts < end) & (ends > begin)
    return trained


def tokenize_example(
    tokenizer: Any, example: Conversation | Completion, options: Options
) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """Tokens, trained flags and notes ("truncated", "duplicate_bos_removed",
    "template_dropped_content") of an example that is one document (see tokenize_documents for
    conversations a template expands)."""
    documents, notes = tokenize_documents(tokenizer, example, options)
    if len(documents) != 1:
        raise ValueError(f"the example is {len(documents)} documents; use tokenize_documents")
    return documents[0][0], documents[0][1], notes


def tokenize_documents(
    tokenizer: Any, example: Conversation | Completion, options: Options
) -> tuple[list[tuple[np.ndarray, np.ndarray]], dict[str, int]]:
    """The documents (tokens, trained flags) of one example, and notes on what was cut and
    how many trained turns the template renders without their text content."""
    notes = {"truncated": 0, "duplicate_bos_removed": 0, "template_dropped_content": 0}
    if isinstance(example, Conversation):
        rendered = render_documents(
            tokenizer, example, options.train_on, options.train_reasoning, **options.kwargs()
        )
        texts = [(r.text, r.spans) for r in rendered]
        notes["template_dropped_content"] = sum(len(r.dropped_content) for r in rendered)
    else:
        texts = [completion_text(tokenizer, example.prompt, example.completion)]
    documents = []
    for text, spans in texts:
        tokens, trained = _tokens_and_flags(tokenizer, text, spans, options, notes)
        # Token 0 is never a target (nothing before it predicts it): count from token 1.
        if trained[1:].any():
            documents.append((tokens, trained))
    if not documents:
        reason = "no_target_tokens_after_truncation" if notes["truncated"] else "no_target_tokens"
        raise BadExample("no trained tokens left", reason)
    return documents, notes


def _tokens_and_flags(
    tokenizer: Any, text: str, spans: list[tuple[int, int]], options: Options, notes: dict
) -> tuple[np.ndarray, np.ndarray]:
    ids, offsets = encode(tokenizer, text, spans)
    tokens = np.asarray(ids, np.int32)
    trained = _overlaps(offsets, spans)
    bos = tokenizer.bos_token_id
    if bos is not None and len(tokens) > 1 and tokens[0] == bos and tokens[1] == bos:
        tokens, trained = tokens[1:], trained[1:]
        notes["duplicate_bos_removed"] = 1
    if len(tokens) > options.max_length:
        if options.overlong == "drop":  # the whole example, never a piece of it
            raise BadExample(
                f"{len(tokens)} tokens, over config.data.max_length={options.max_length}",
                "too_long",
            )
        tokens, trained = tokens[: options.max_length], trained[: options.max_length]
        notes["truncated"] = 1
    return tokens, trained


_worker_tokenizer = None


def _init_worker(tokenizer: Any) -> None:
    global _worker_tokenizer
    _worker_tokenizer = tokenizer


def _tokenize_chunk(
    records: list[Record], options: Options, tokenizer: Any = None
) -> tuple[list[tuple[np.ndarray, np.ndarray]], dict[str, Any], list[tuple[str, str, str]]]:
    """Documents, stats and bad examples (where, problem, reason) of a chunk of records."""
    tokenizer = tokenizer or _worker_tokenizer
    docs, stats, bad = [], empty_stats(), []
    for record in records:
        stats["examples_read"] += 1
        try:
            example = normalize(record.value, options.data_format)
            _note_empty_reply(example, record.where, options, stats)
            documents, notes = tokenize_documents(tokenizer, example, options)
        except BadExample as e:
            bad.append((record.where, str(e), e.reason))
            continue
        except TemplateError as e:  # the template, not the example: always an error
            raise TemplateError(f"{record.where}: {e}") from None
        docs.extend(documents)
        if len(documents) > 1:
            stats["expanded_examples"] += 1
            stats["expanded_documents"] += len(documents)
        stats["truncated"] += notes["truncated"]
        stats["duplicate_bos_removed"] += notes["duplicate_bos_removed"]
        note_dropped_content(notes["template_dropped_content"], record.where, stats)
    return docs, stats, bad


def note_dropped_content(turns: int, where: str, stats: dict[str, Any]) -> None:
    """Counts the trained turns of a kept example that the template renders without their text
    content, and where the first was read."""
    if turns:
        stats["template_dropped_content"] += turns
        stats["first_template_dropped_content"] = stats["first_template_dropped_content"] or where


def _note_empty_reply(
    example: Conversation | Completion, where: str, options: Options, stats: dict[str, Any]
) -> None:
    """Counts an example whose trained assistant turns include an empty one; with
    empty_replies="skip" or "error" it is a BadExample instead."""
    if not isinstance(example, Conversation):
        return
    trained = example.messages[example.trained_from :]
    empty = [
        m
        for m in trained
        if m["role"] == "assistant"
        and not str(m.get("content") or "").strip()
        and not m.get("tool_calls")
        and not str(m.get("reasoning_content") or "").strip()
    ]
    if not empty:
        return
    if options.empty_replies != "warn":
        raise BadExample(
            "an assistant reply is empty (it would train only its end-of-turn token)", "empty_reply"
        )
    stats["empty_replies"] += 1
    stats["first_empty_reply"] = stats["first_empty_reply"] or where


# Reasons that are part of normal SFT data handling rather than malformed input: always a
# counted drop, never an error.
EXPECTED_DROPS = ("no_target_tokens", "no_target_tokens_after_truncation", "too_long")


def _dropped(bad: list[tuple[str, str, str]], options: Options) -> dict[str, int]:
    """Drop reasons of a chunk's bad examples; DataError for one that is not to be skipped."""
    dropped: collections.Counter[str] = collections.Counter()
    for where, problem, reason in bad:
        if reason == "empty_reply" and options.empty_replies == "error":
            raise DataError(
                f"{where}: {problem}. Fix the example, or set config.data.empty_replies="
                "'skip' (drop such examples) or 'warn' (train them, with a warning)."
            )
        skip = options.skip_bad or reason == "empty_reply"
        if reason not in EXPECTED_DROPS and not skip:
            raise DataError(
                f"{where}: {problem}. Fix the example, or set "
                "config.data.skip_bad_examples=True to count and skip such examples."
            )
        dropped[reason] += 1
    return dict(sorted(dropped.items()))


def tokenized_chunks(
    tokenizer: Any, records: Iterable[Record], options: Options, workers: int = 1
) -> Iterator[Tokenized]:
    """Every record tokenized, _CHUNK records at a time and in order, each chunk's documents
    with that chunk's stats (stats.add sums them); bad ones raise DataError, or are counted
    when skip_bad. Only the chunks in flight are held: memory does not grow with the data."""
    for docs, stats, bad in _map_chunks(tokenizer, records, options, workers):
        tokenized = from_documents(docs, stats)
        stats["dropped"] = _dropped(bad, options)
        stats["examples_kept"] = stats["examples_read"] - sum(stats["dropped"].values())
        stats["documents"] = len(tokenized)
        stats["tokens"] = len(tokenized.tokens)
        stats["trainable_tokens"] = trainable_tokens(tokenized)
        yield tokenized


def tokenize_records(
    tokenizer: Any, records: Iterable[Record], options: Options, workers: int = 1
) -> Tokenized:
    """Every record tokenized, in memory (tokenized_chunks, joined)."""
    stats, docs = empty_stats(), []
    for part in tokenized_chunks(tokenizer, records, options, workers):
        docs.extend(part.document(i) for i in range(len(part)))
        stats_add(stats, part.stats)
    return from_documents(docs, stats)


def trainable_tokens(tokenized: Tokenized) -> int:
    """Trained tokens that have a token before them, i.e. the targets training will see."""
    firsts = np.zeros(len(tokenized.tokens), bool)
    firsts[tokenized.offsets[:-1][tokenized.lengths() > 0]] = True
    return int(np.sum(tokenized.trained & ~firsts))


def _chunks(records: Iterable[Record]) -> Iterable[list[Record]]:
    chunk = []
    for record in records:
        chunk.append(record)
        if len(chunk) == _CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _map_chunks(tokenizer: Any, records: Iterable[Record], options: Options, workers: int):
    if workers <= 1:
        for chunk in _chunks(records):
            yield _tokenize_chunk(chunk, options, tokenizer)
        return
    # spawn, not fork: the parent may already run JAX threads.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        workers, mp_context=context, initializer=_init_worker, initargs=(tokenizer,)
    ) as pool:
        # At most two chunks a worker in flight (Executor.map would submit every chunk at
        # once, holding all the records in memory).
        pending: collections.deque = collections.deque()
        for chunk in _chunks(records):
            pending.append(pool.submit(_tokenize_chunk, chunk, options))
            if len(pending) > 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Changes with the vocabulary, merges, special tokens or chat template."""
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    digest.update((backend.to_str() if backend is not None else repr(tokenizer)).encode())
    digest.update(str(tokenizer.chat_template).encode())
    digest.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def code_fingerprint() -> str:
    """Changes whenever the code that renders, spans and tokenizes examples changes."""
    digest = hashlib.sha256()
    for name in SPAN_CODE:
        digest.update((Path(__file__).parent / name).read_bytes())
    return digest.hexdigest()


def cache_key(data_fingerprint: str, tokenizer: Any, options: Options) -> str:
    """Changes with the data, the tokenizer (its chat template included), the options (the
    template kwargs included) and the span code."""
    parts = [
        code_fingerprint(),
        data_fingerprint,
        tokenizer_fingerprint(tokenizer),
        json.dumps(dataclasses.asdict(options), sort_keys=True),
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def load_cached(cache_dir: Path, key: str) -> Tokenized | None:
    path = cache_dir / f"{key}.npz"
    if not path.exists():
        return None
    try:
        with np.load(path) as f:
            return Tokenized(f["tokens"], f["trained"], f["offsets"], json.loads(str(f["stats"])))
    except Exception as e:  # a damaged cache file is rebuilt, never trusted
        log.warning("tokenization cache %s is unreadable (%s); tokenizing again.", path, e)
        return None


def save_cached(cache_dir: Path, key: str, tokenized: Tokenized) -> None:
    """Written to a temporary name then renamed, so a crash never leaves a half file."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    temporary = cache_dir / f"{key}.{os.getpid()}.tmp.npz"
    np.savez(
        temporary,
        tokens=tokenized.tokens,
        trained=tokenized.trained,
        offsets=tokenized.offsets,
        stats=np.array(json.dumps(tokenized.stats)),
    )
    os.replace(temporary, cache_dir / f"{key}.npz")
