"""A reward model's score head (transformers' *ForSequenceClassification): init, config.json."""

from __future__ import annotations

import logging
from typing import Any

import jax

log = logging.getLogger(__name__)


def new_score_head(target: jax.ShapeDtypeStruct, param_sharding: Any) -> jax.Array:
    """A reward model's head for a causal LM's checkpoint: normal(0, 0.02), as transformers
    initializes it, from a fixed key (a run's start is reproducible)."""
    log.info("score head: not in the checkpoint, initialized normal(0, 0.02)")
    init = jax.jit(
        lambda: (0.02 * jax.random.normal(jax.random.key(0), target.shape)).astype(target.dtype),
        out_shardings=param_sharding,
    )
    return init()


def reward_pad_id(tokenizer_pad_id: int | None, hf_config: dict[str, Any]) -> int | None:
    """The pad id a reward model reads sequences up to: the tokenizer's, else config.json's
    (training and the exported config.json use the same one)."""
    return tokenizer_pad_id if tokenizer_pad_id is not None else hf_config.get("pad_token_id")


def sequence_classification_config(
    hf_config: dict[str, Any], labels: int, pad_token_id: int | None
) -> dict[str, Any]:
    """The config.json of a reward model (transformers' *ForSequenceClassification, which
    scores each sequence at its last token that is not pad_token_id)."""
    if pad_token_id is None:
        raise ValueError("a reward model's export needs a pad token id (the tokenizer has none).")
    architectures = hf_config.get("architectures") or []
    causal = [a for a in architectures if a.endswith("ForCausalLM")]
    if not causal and not architectures[0].endswith("ForSequenceClassification"):
        raise ValueError(
            f"architectures={architectures}: no *ForCausalLM to turn into a reward model."
        )
    name = (
        causal[0].removesuffix("ForCausalLM") + "ForSequenceClassification"
        if causal
        else (architectures[0])
    )
    id2label = {str(i): f"LABEL_{i}" for i in range(labels)}
    return {
        **{k: v for k, v in hf_config.items() if k != "num_labels"},
        "architectures": [name],
        "id2label": id2label,
        "label2id": {v: int(k) for k, v in id2label.items()},
        "pad_token_id": pad_token_id,
    }
