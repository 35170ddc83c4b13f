"""SFT data: files or hub datasets -> chat-templated, masked, packed fixed-shape batches."""

from sft_jax.data.pipeline import load_datasets, load_tokenizer, open_data
from sft_jax.data.records import DataError
from sft_jax.data.templates import TemplateError, resolve_chat_template

__all__ = [
    "DataError",
    "TemplateError",
    "load_datasets",
    "load_tokenizer",
    "open_data",
    "resolve_chat_template",
]
