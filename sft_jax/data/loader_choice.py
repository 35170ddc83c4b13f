"""config.data.loader="auto": the in-memory loader for data that fits, the stream loader above a
size, so large data is never held in memory by default; the log says which and why."""

from __future__ import annotations

import logging
import os

from sft_jax.adapters.prompts import PromptSpec
from sft_jax.core.spec import RunSpec
from sft_jax.data import cloud, records

log = logging.getLogger(__name__)
LOADERS = ("auto", "memory", "stream")  # config.data.loader
# Training files larger than this stream: held in memory, tokenized data costs ~1.3x the JSONL
# (int32 tokens and a flag per token, ~4 bytes of text a token) and tokenizing it more.
STREAM_ABOVE_BYTES = 256 * 2**20


def train_bytes(sources: list[str]) -> int | None:
    """Bytes of the training files; None when one is a hub dataset (its size is not known
    before it is downloaded)."""
    if any(source.startswith(records.HUB_PREFIX) for source in sources):
        return None
    return sum(
        cloud.size(source) if cloud.is_remote(source) else os.path.getsize(source)
        for source in sources
    )


def _auto(config: RunSpec) -> tuple[str, str]:
    """(loader, why) for loader="auto"."""
    data = config.data
    if data.mixture or data.contamination != "off":
        return "stream", "a mixture and the contamination check are the stream loader's"
    if data.eval_fraction > 0:
        return "memory", "eval_fraction splits eval examples off train_files in memory"
    if PromptSpec.from_config(config).tokens_in_rows:
        return "memory", f"prompt.method={config.prompt.method!r} adds tokens to in-memory rows"
    size = train_bytes(records.expand_sources(data.train_files, "config.data.train_files"))
    if size is None:
        return "memory", "a hub dataset's size is not known: set loader='stream' for large data"
    held = f"the training files hold {_mib(size)}"
    if size > STREAM_ABOVE_BYTES:
        return "stream", f"{held}, over {_mib(STREAM_ABOVE_BYTES)}"
    return "memory", f"{held}, at most {_mib(STREAM_ABOVE_BYTES)}"


def _mib(size: int) -> str:
    return f"{size / 2**20:,.1f} MiB"


def choose(config: RunSpec, saved: str = "") -> RunSpec:
    """`config` with a concrete data.loader: "auto" becomes the loader of the run being resumed
    (`saved`: its checkpoint's config.data.loader, "" when none), else the one _auto picks;
    logged. An explicit "memory" or "stream" is kept."""
    if config.data.loader != "auto":
        return config
    if saved in ("memory", "stream"):
        loader, why = saved, "the checkpoint being resumed was trained with it"
    else:
        loader, why = _auto(config)
    log.info("config.data.loader='auto': %r (%s)", loader, why)
    return config.with_values({"data.loader": loader})
