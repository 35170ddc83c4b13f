"""SFT data: files or hub datasets -> chat-templated, masked, packed fixed-shape batches.

The names below load on first use (PEP 562): a tokenizer worker process imports
sft_jax.data.tokenize, and with it this package, so the package itself imports nothing
heavy (the pipeline modules bring JAX and flax, ~200 MB a process).
"""

from __future__ import annotations

import importlib
from typing import Any

# Public name -> the module that defines it.
_EXPORTS = {
    "DataError": "sft_jax.data.records",
    "DataSource": "sft_jax.data.pipeline",
    "TemplateError": "sft_jax.data.templates",
    "load_datasets": "sft_jax.data.pipeline",
    "load_tokenizer": "sft_jax.data.templates",
    "open_data": "sft_jax.data.pipeline",
    "open_pair_data": "sft_jax.data.preference",
    "open_stream_data": "sft_jax.data.mixture",
    "resolve_chat_template": "sft_jax.data.templates",
    "run_tokenizer": "sft_jax.data.pipeline",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
