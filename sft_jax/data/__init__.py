"""SFT data: files or hub datasets -> chat-templated, masked, packed fixed-shape batches."""

import ml_collections

from sft_jax.data.mixture import open_stream_data
from sft_jax.data.pipeline import DataSource, load_datasets, open_data, run_tokenizer
from sft_jax.data.preference import open_pair_data
from sft_jax.data.records import DataError
from sft_jax.data.templates import TemplateError, load_tokenizer, resolve_chat_template

__all__ = [
    "DataError",
    "DataSource",
    "TemplateError",
    "load_datasets",
    "load_tokenizer",
    "open_data",
    "open_pair_data",
    "open_run_data",
    "open_stream_data",
    "resolve_chat_template",
    "run_tokenizer",
]


def open_run_data(
    config: ml_collections.ConfigDict, feed: tuple[int, int] | None = None
) -> DataSource:
    """The run's data: preference pairs for a preference objective, else SFT examples. feed:
    (block, blocks) of each global batch's rows this process feeds (sharding.row_feed; the
    trainer passes it), else each process its own block."""
    if config.train.get("objective", "sft") != "sft":
        return open_pair_data(config, feed)
    if config.data.get("loader", "memory") == "stream":
        return open_stream_data(config, feed)
    return open_data(config, feed)
