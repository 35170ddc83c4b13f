"""Prompt datasets for online RL, in TRL's format: one record per prompt,

  {"prompt": "What is 17 + 25?", "solution": "42"}                      (text)
  {"prompt": [{"role": "user", "content": "What is 17 + 25?"}], "answer": "42"}   (chat)

`prompt` is a string (used as it is) or a message list (rendered by the chat template with the
assistant's turn opened, as TRL renders it); every other field is kept and passed to the reward
functions by name, one value per completion. Tokens are the rendered text's, without special
tokens added (the template writes BOS itself), as TRL tokenizes prompts. Files as for SFT data:
jsonl, json, parquet, csv, globs, buckets, `hf:NAME` where the network allows.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
from collections.abc import Mapping
from typing import Any

from sft_jax.core.spec import RunSpec
from sft_jax.data import templates
from sft_jax.data.messages import BadExample
from sft_jax.data.pipeline import DataSource, run_tokenizer
from sft_jax.data.records import DataError, expand_sources, read_records

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Prompt:
    where: str  # file:line
    prompt: Any  # as the data has it: what reward functions get as `prompts`
    ids: tuple[int, ...]  # the rendered prompt's tokens
    columns: Mapping[str, Any]  # the record's other fields
    conversational: bool  # a message list: completions go to rewards as messages (TRL)


@dataclasses.dataclass
class PromptSet:
    train: list[Prompt]
    eval: list[Prompt]
    skipped: dict[str, int]  # reason -> prompts left out of train and eval


class _Skips:
    """Counted skips (the config allows them), or a DataError at the first bad record."""

    def __init__(self, allowed: bool):
        self.allowed, self.counts = allowed, collections.Counter()
        self.first: dict[str, str] = {}

    def bad(self, where: str, problem: str, reason: str = "bad_record") -> None:
        if not self.allowed:
            raise DataError(
                f"{where}: {problem}. Fix the record, or set config.data.skip_bad_examples=True "
                "to skip and count such records."
            )
        self.counts[reason] += 1
        self.first.setdefault(reason, f"{where}: {problem}")


def _render(tokenizer: Any, value: Any, template_kwargs: dict) -> tuple[str, bool]:
    """(the prompt's text, whether it is a conversation)."""
    if isinstance(value, str):
        if not value:
            raise BadExample("field 'prompt' is empty", "empty_prompt")
        return value, False
    if not isinstance(value, list) or not value:
        raise BadExample(
            "field 'prompt' must be a string or a non-empty list of messages, got "
            f"{type(value).__name__}",
            "mistyped_field",
        )
    for index, turn in enumerate(value):
        if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
            raise BadExample(
                f"prompt[{index}] must be an object with 'role' and 'content', got {turn!r:.80}",
                "mistyped_field",
            )
    text = templates.render(tokenizer, value, generation_prompt=True, kwargs=template_kwargs)
    return text, True


def read_prompts(
    files: str, field: str, split: str, tokenizer: Any, config: RunSpec, skips: _Skips
) -> list[Prompt]:
    """The prompts of config.data.<field> (see the module docstring); records that are not
    prompts, and prompts over grpo.max_prompt_length tokens, skipped or refused as configured."""
    limit, long_prompts = config.grpo.max_prompt_length, config.grpo.long_prompts
    template_kwargs = json.loads(config.data.template_kwargs or "{}")  # checked: an object
    out = []
    for source in expand_sources(files, f"config.data.{field}"):
        for record in read_records(source, split, skips):
            value = record.value
            if not isinstance(value, dict) or "prompt" not in value:
                got = sorted(value) if isinstance(value, dict) else type(value).__name__
                skips.bad(record.where, f"a prompt record needs a 'prompt' field (got {got})")
                continue
            try:
                text, conversational = _render(tokenizer, value["prompt"], template_kwargs)
            except BadExample as e:
                skips.bad(record.where, str(e), e.reason)
                continue
            ids = tuple(tokenizer(text, add_special_tokens=False)["input_ids"])
            if len(ids) > limit:
                problem = f"the prompt has {len(ids)} tokens, over grpo.max_prompt_length={limit}"
                if long_prompts == "error":
                    raise DataError(
                        f"{record.where}: {problem}. Raise the limit, shorten the prompt, or set "
                        "config.grpo.long_prompts='skip' to skip and count such prompts."
                    )
                skips.counts["long_prompt"] += 1
                skips.first.setdefault("long_prompt", f"{record.where}: {problem}")
                continue
            columns = {k: v for k, v in value.items() if k != "prompt"}
            out.append(Prompt(record.where, value["prompt"], ids, columns, conversational))
    return out


def load_prompts(config: RunSpec, tokenizer: Any) -> PromptSet:
    """config.data.train_files' prompts and config.data.eval_files' (held out; at most
    config.data.eval_max_examples of them where that is positive)."""
    data = config.data
    skips = _Skips(data.skip_bad_examples)
    train = read_prompts(
        data.train_files, "train_files", data.train_split, tokenizer, config, skips
    )
    held_out = []
    if data.eval_files:
        held_out = read_prompts(
            data.eval_files, "eval_files", data.eval_split, tokenizer, config, skips
        )
        if data.eval_max_examples > 0:
            held_out = held_out[: data.eval_max_examples]
    if not train:
        skipped = ""
        if skips.counts:
            skipped = f" (skipped: {dict(skips.counts)}; the first: {min(skips.first.values())})"
        raise DataError(f"config.data.train_files={data.train_files!r}: no usable prompt{skipped}.")
    for reason, count in sorted(skips.counts.items()):
        log.warning("skipped %d prompts (%s); the first: %s", count, reason, skips.first[reason])
    return PromptSet(train, held_out, dict(skips.counts))


def open_prompt_data(config: RunSpec, feed: tuple[int, int] | None = None) -> DataSource:
    """The data of an online RL run: its prompts (DataSource.prompts) and row shape. Train rows
    are sampled from the policy (sft_jax.loop.rollouts), not read: train_batches is empty, and so
    are eval_batches (held-out prompts are evaluated by sampling)."""
    del feed  # every process samples every prompt's completions and keeps its rows
    tokenizer = run_tokenizer(config)
    prompts = load_prompts(config, tokenizer)
    grpo = config.grpo
    return DataSource(
        train_batches=iter(()),
        eval_batches=lambda: [],
        seq_len=grpo.max_prompt_length + grpo.max_completion_length,
        max_segments=2,  # one sequence and the padding after it
        tokenizer=tokenizer,
        prompts=prompts,
    )


def columns_of(prompts: list[Prompt], repeat: int) -> dict[str, list[Any]]:
    """The prompts' other fields as TRL passes them: field -> one value per completion (each
    prompt's repeated `repeat` times); a field some prompts lack is None there."""
    names = sorted({name for p in prompts for name in p.columns})
    return {name: [p.columns.get(name) for p in prompts for _ in range(repeat)] for name in names}
