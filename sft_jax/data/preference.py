"""Preference pairs: TRL's preference formats -> chosen and rejected documents -> rows of pairs.

Formats (the fields of the first example decide, as for SFT data):
  {"prompt": "2+2=", "chosen": "4", "rejected": "5"}                      strings
  {"prompt": [messages], "chosen": [assistant messages], "rejected": [...]}  conversational
  {"chosen": [messages], "rejected": [messages]}   implicit prompt: the shared message prefix
  {"chosen": "\\n\\nHuman: ... \\n\\nAssistant: A", "rejected": "... Assistant: B"}  HH-style
Strings render as plain text (BOS? prompt reply EOS, as SFT's prompt_completion), messages with
the chat template; the trained tokens are SFT's (sft_jax.data.tokenize): the reply and its
end-of-turn token, never the prompt or the assistant header. (TRL's DPOTrainer also trains what
the template writes after the end-of-turn token, e.g. Qwen's "\\n": not followed.)

Pair k of the data is documents 2k (chosen) and 2k + 1 (rejected); a row holds whole pairs, so
that in a batch pair j of a row is segments 2j - 1 and 2j (what sft_jax.objectives.preference
reads):

  row   = [P C C <eot>][P R <eot>][pad]     segment_ids = [1 1 1 1 2 2 2 0]
A pair whose two documents do not fit in one row (config.data.max_length) is dropped and counted
("pair_too_long"). Bad pairs (identical replies, an empty reply, a prompt that is not a prefix of
the conversation, a `margin` that is not a number) stop the run naming file:line, or are counted
with skip_bad_examples. A pair's margin (TRL's optional column; 0 without it) rides with it into
the rows (MARGIN_KEY, a value per segment), and so do DPO's reference log-probs once
precomputed (REFERENCE_KEY, per token; Pairs.precompute_reference), whatever rows packing
makes.
"""

from __future__ import annotations

import collections
import logging
import math
import numbers
from collections.abc import Iterator
from typing import Any

import numpy as np

from sft_jax.core.batch import MARGIN_KEY, REFERENCE_KEY, shape
from sft_jax.core.spec import RunSpec
from sft_jax.data import batches, pipeline, records, tokenize
from sft_jax.data.formats import ROLES, BadExample, Completion, Conversation, _messages
from sft_jax.data.records import DataError

log = logging.getLogger(__name__)
HH_ASSISTANT = "\n\nAssistant:"


def is_preference(value: Any) -> bool:
    return isinstance(value, dict) and "chosen" in value and "rejected" in value


def _shared_prefix(chosen: Any, rejected: Any) -> int:
    """Length of the common prefix of two strings or two lists."""
    count = 0
    for a, b in zip(chosen, rejected, strict=False):
        if a != b:
            break
        count += 1
    return count


def _implicit_text_prompt(chosen: str, rejected: str) -> int:
    """Where the shared prompt of two full texts ends: after the last HH "Assistant:" of the
    common prefix (HH-RLHF), else TRL's rule (the common prefix, less a trailing space)."""
    common = _shared_prefix(chosen, rejected)
    marker = chosen.rfind(HH_ASSISTANT, 0, common)
    if marker >= 0:
        return marker + len(HH_ASSISTANT)
    return common - 1 if common and chosen[common - 1] == " " else common


def _conversational(value: dict[str, Any]) -> tuple[Conversation, Conversation]:
    chosen = _messages(value["chosen"], "chosen", "role", "content", ROLES)
    rejected = _messages(value["rejected"], "rejected", "role", "content", ROLES)
    if "prompt" in value:
        prompt = _messages(value["prompt"], "prompt", "role", "content", ROLES)
        sides = []
        for name, turns in (("chosen", chosen), ("rejected", rejected)):
            if turns[0]["role"] != "assistant":  # a full conversation: the prompt must lead it
                if turns[: len(prompt)] != prompt:
                    raise BadExample(f"the prompt is not a prefix of {name!r}", "prompt_not_prefix")
                turns = turns[len(prompt) :]
            sides.append(turns)
        chosen, rejected = sides
    else:
        shared = _shared_prefix(chosen, rejected)
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
    for name, turns in (("chosen", chosen), ("rejected", rejected)):
        if not turns or not any(t["role"] == "assistant" and t["content"].strip() for t in turns):
            raise BadExample(
                f"{name!r} has no assistant reply after the prompt", "empty_completion"
            )
    if not prompt:
        raise BadExample("chosen and rejected share no prompt", "prompt_not_prefix")
    return (
        Conversation(prompt + chosen, trained_from=len(prompt)),
        Conversation(prompt + rejected, trained_from=len(prompt)),
    )


def normalize_pair(value: Any) -> tuple[Conversation | Completion, Conversation | Completion]:
    """One preference example -> (chosen, rejected) examples of the SFT tokenizer, or BadExample."""
    if not is_preference(value):
        raise BadExample("expected the fields 'chosen' and 'rejected'", "missing_field")
    if value["chosen"] == value["rejected"]:
        raise BadExample("'chosen' and 'rejected' are identical", "identical_pair")
    if isinstance(value["chosen"], list) or isinstance(value.get("prompt"), list):
        return _conversational(value)
    for field in ("prompt", "chosen", "rejected"):
        if field in value and not isinstance(value[field], str):
            raise BadExample(
                f"field {field!r} must be a string or a list of messages", "mistyped_field"
            )
    chosen, rejected = value["chosen"], value["rejected"]
    prompt = value.get("prompt")
    if prompt is None:
        cut = _implicit_text_prompt(chosen, rejected)
        prompt, chosen, rejected = chosen[:cut], chosen[cut:], rejected[cut:]
    if not chosen.strip() or not rejected.strip():
        raise BadExample("an empty reply after the prompt", "empty_completion")
    return Completion(prompt, chosen), Completion(prompt, rejected)


def pair_margin(value: dict[str, Any]) -> float:
    """TRL's optional `margin` column (RewardTrainer: loss -log s(r_c - r_r - margin)): a
    finite number (or its text, as CSV gives it); 0 without the field."""
    margin = value.get("margin", 0.0)
    try:
        if isinstance(margin, bool) or not isinstance(margin, numbers.Real | str):
            raise ValueError
        margin = float(margin)
    except ValueError:
        raise BadExample(f"'margin' must be a number, got {margin!r}", "bad_margin") from None
    if not math.isfinite(margin):
        raise BadExample(f"'margin' must be finite, got {margin!r}", "bad_margin")
    return margin


class Pairs:
    """Pair documents (pair k: documents 2k chosen, 2k + 1 rejected) seen as pairs, the unit
    the row packer packs, with each pair's margin and, once precomputed, the reference model's
    log-probs of every token (reference_logps[i]: log p(tokens[i]) given the tokens of its
    document before it; 0 for a first or untrained token)."""

    def __init__(self, documents: tokenize.Tokenized, margins: np.ndarray | None = None):
        self.documents = documents
        self.margins = np.zeros(len(self), np.float32) if margins is None else margins
        self.reference_logps: np.ndarray | None = None
        self.stats = documents.stats

    def __len__(self) -> int:
        return len(self.documents) // 2

    def lengths(self) -> np.ndarray:
        lengths = self.documents.lengths()
        return lengths[0::2] + lengths[1::2]

    def make_rows(self, rows: list[list[int]], row_len: int) -> dict[str, np.ndarray]:
        """The arrays of rows of pairs (batches.make_rows of their documents), with MARGIN_KEY
        (per segment: pair j of a row, segments 2j + 1 and 2j + 2, has its margin at index 2j)
        and, once precomputed, REFERENCE_KEY aligned with target_ids (as target_mask: the
        value of token t + 1 at position t)."""
        out = batches.make_rows(self.documents, documents_of(rows), row_len)
        out[MARGIN_KEY] = np.zeros(shape(MARGIN_KEY, len(rows), row_len), np.float32)
        reference = self.reference_logps
        if reference is not None:
            out[REFERENCE_KEY] = np.zeros(shape(REFERENCE_KEY, len(rows), row_len), np.float32)
        offsets = self.documents.offsets
        for r, doc, start, end in self._spans(rows):
            if reference is not None:
                span = reference[offsets[doc] + 1 : offsets[doc + 1]]
                out[REFERENCE_KEY][r, start : end - 1] = span
        for r, docs in enumerate(documents_of(rows)):
            for index, doc in enumerate(docs):  # segment index + 1
                if doc % 2 == 0:
                    out[MARGIN_KEY][r, index] = self.margins[doc // 2]
        return out

    def _spans(self, rows: list[list[int]]) -> Iterator[tuple[int, int, int, int]]:
        """(row, document, start, end) of every document of rows of pairs, in row order."""
        offsets = self.documents.offsets
        for r, docs in enumerate(documents_of(rows)):
            start = 0
            for doc in docs:
                end = start + int(offsets[doc + 1] - offsets[doc])
                yield r, doc, start, end
                start = end

    def precompute_reference(
        self, score: Any, global_rows: int, row_len: int, max_pairs: int, process: tuple
    ) -> None:
        """reference_logps from one pass of `score` (pipeline.DataSource.precompute_reference)
        over every pair, packed into fixed rows of at most max_pairs pairs (0: no limit)."""
        rows = batches.eval_rows(self, row_len=row_len, packing=True, max_docs=max_pairs)
        store = np.zeros(len(self.documents.tokens), np.float32)
        offsets = self.documents.offsets
        for number, local in enumerate(batches.local_rows(rows, global_rows, *process)):
            logps = score(self.make_rows(local, row_len))  # every process's rows
            batch = rows[number * global_rows : (number + 1) * global_rows]
            for r, doc, start, end in self._spans(batch):
                store[offsets[doc] + 1 : offsets[doc + 1]] = logps[r, start : end - 1]
        self.reference_logps = store


def tokenize_pairs(tokenizer: Any, stream: Any, options: tokenize.Options) -> Pairs:
    """Chosen and rejected documents of every pair (pair k: documents 2k, 2k + 1) and their
    margins; bad pairs raise DataError naming their file:line, or are counted when
    options.skip_bad."""
    docs, margins, stats = [], [], tokenize.empty_stats()
    dropped: collections.Counter[str] = collections.Counter()
    for record in stream:
        stats["examples_read"] += 1
        try:
            sides = [
                tokenize.tokenize_example(tokenizer, side, options)
                for side in normalize_pair(record.value)
            ]
            pair = [(tokens, trained) for tokens, trained, _ in sides]
            margin = pair_margin(record.value)
            if sum(len(tokens) for tokens, _ in pair) > options.max_length:
                raise BadExample("chosen and rejected do not fit in one row", "pair_too_long")
        except BadExample as e:
            expected = e.reason in (*tokenize.EXPECTED_DROPS, "pair_too_long")
            if not (expected or options.skip_bad):
                raise DataError(
                    f"{record.where}: {e}. Fix the pair, or set "
                    "config.data.skip_bad_examples=True to count and skip such "
                    "pairs."
                ) from None
            dropped[e.reason] += 1
            continue
        except tokenize.TemplateError as e:
            raise tokenize.TemplateError(f"{record.where}: {e}") from None
        docs.extend(pair)
        margins.append(margin)
        dropped_content = sum(notes["template_dropped_content"] for *_, notes in sides)
        tokenize.note_dropped_content(dropped_content, record.where, stats)
    tokenized = tokenize.from_documents(docs, stats)
    stats |= {
        "dropped": dict(sorted(dropped.items())),
        "examples_kept": len(docs) // 2,
        "tokens": len(tokenized.tokens),
        "trainable_tokens": tokenize.trainable_tokens(tokenized),
    }
    return Pairs(tokenized, np.asarray(margins, np.float32))


def documents_of(rows: list[list[int]]) -> list[list[int]]:
    """Rows of pair indices -> rows of document indices (chosen, rejected, chosen, ...)."""
    return [[doc for pair in row for doc in (2 * pair, 2 * pair + 1)] for row in rows]


class PairTrainBatches(batches.TrainBatches):
    """TrainBatches whose packing unit is a pair (see the module docstring)."""

    def __init__(self, pairs: Pairs, **kwargs: Any):
        self.pairs = pairs
        super().__init__(pairs, **kwargs)

    def make_rows(self, rows: list[list[int]]) -> dict[str, np.ndarray]:
        return self.pairs.make_rows(rows, self.row_len)


def _load(spec: str, split: str, field: str, tokenizer: Any, data: Any) -> Pairs:
    sources = records.expand_sources(spec, field)
    options = tokenize.Options("messages", data.train_on, data.max_length, data.skip_bad_examples)
    bad = pipeline.BadRecords(data.skip_bad_examples)
    stream = (r for source in sources for r in records.read_records(source, split, bad))
    pairs = tokenize_pairs(tokenizer, stream, options)
    if len(pairs) == 0:
        raise DataError(
            f"{field}={spec!r}: no usable preference pairs in "
            f"{pairs.stats['examples_read']} examples (dropped: "
            f"{pairs.stats['dropped']})."
        )
    log.info("%s: %s", field, pipeline.summary_line(pairs.stats))
    pipeline.warn_about_dropped_content(field, pairs.stats)
    return pairs


def open_pair_data(config: RunSpec, feed: tuple[int, int] | None = None) -> pipeline.DataSource:
    """The trainer's DataSource of preference pairs (config.data, as for SFT data; no cache);
    `feed`: pipeline.row_share."""
    data, process = config.data, pipeline.row_share(feed)
    tokenizer = pipeline.run_tokenizer(config)
    train = _load(data.train_files, data.train_split, "config.data.train_files", tokenizer, data)
    evaluation = None
    if data.eval_files:
        evaluation = _load(
            data.eval_files, data.eval_split, "config.data.eval_files", tokenizer, data
        )
    documents = data.max_documents_per_row
    max_pairs = max(1, documents // 2) if documents else 0  # 0: no limit
    train_batches = PairTrainBatches(
        train,
        **pipeline.row_options(config, feed),
        max_docs=max_pairs,
        fingerprint=f"pairs/{data.train_files}/{tokenize.tokenizer_fingerprint(tokenizer)}",
    )
    pairs_per_row, eval_rows, prompts = train_batches.documents_per_row(), [], []
    if evaluation is not None:
        eval_rows = batches.eval_rows(
            evaluation, row_len=data.max_length, packing=data.packing, max_docs=max_pairs
        )
        pairs_per_row = max([pairs_per_row, *(len(row) for row in eval_rows)])
        chosen = evaluation.documents.subset(range(0, len(evaluation.documents), 2))
        count = max(config.eval.generate_examples, config.eval.show_samples)
        prompts = pipeline.eval_prompts(chosen, count)
    eval_data: list[dict[str, np.ndarray]] = []  # built once, again after precompute_reference

    def eval_batches() -> list[dict[str, np.ndarray]]:
        if evaluation is not None and not eval_data:
            groups = batches.local_rows(eval_rows, config.eval.global_batch_size, *process)
            eval_data.extend(evaluation.make_rows(rows, data.max_length) for rows in groups)
        return eval_data

    def precompute_reference(score: Any, global_rows: int) -> None:
        for pairs in (train, evaluation) if evaluation is not None else (train,):
            pairs.precompute_reference(score, global_rows, data.max_length, pairs_per_row, process)
        eval_data.clear()

    return pipeline.DataSource(
        train_batches=train_batches,
        eval_batches=eval_batches,
        seq_len=data.max_length,
        max_segments=2 * pairs_per_row + 1,
        tokenizer=tokenizer,
        eval_prompts=prompts,
        precompute_reference=precompute_reference,
    )
