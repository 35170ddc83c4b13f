"""SFT data: files or hub datasets -> chat-templated, masked, packed fixed-shape batches."""

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
    "open_stream_data",
    "resolve_chat_template",
    "run_tokenizer",
]
