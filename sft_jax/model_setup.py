"""The model a run trains, built from its config: loaded, optionally quantized, with adapters."""

from __future__ import annotations

import logging
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from sft_jax.errors import ConfigError
from sft_jax.lora import LoRASpec, apply_lora, trainable_filter
from sft_jax.models import CausalLM, from_pretrained
from sft_jax.models.decoder import (
    ATTENTION_KINDS,
    REMAT_POLICIES,
    SPLASH_BLOCKS,
    SPLASH_INTERPRET,
)

log = logging.getLogger(__name__)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def dtype_of(name: str, field: str) -> Any:
    if name not in DTYPES:
        raise ConfigError(f"{field}={name!r}: expected one of {', '.join(DTYPES)}.")
    return DTYPES[name]


def build_model(config: ml_collections.ConfigDict, mesh: Mesh) -> tuple[CausalLM, LoRASpec, Any]:
    """(model on the mesh, its LoRA spec, the filter of what training updates)."""
    spec = LoRASpec.from_config(config.lora)
    if config.model.attention not in ATTENTION_KINDS:
        raise ConfigError(
            f"config.model.attention={config.model.attention!r}: expected one of "
            f"{', '.join(ATTENTION_KINDS)}."
        )
    if config.model.attention == "cudnn" and jax.default_backend() != "gpu":
        raise ConfigError(
            f"config.model.attention='cudnn' needs an NVIDIA GPU, but this run's backend is "
            f"{jax.default_backend()}; use 'xla'."
        )
    if config.model.attention == "splash":
        if jax.default_backend() != "tpu" and not SPLASH_INTERPRET["interpret"]:
            raise ConfigError(
                f"config.model.attention='splash' is a TPU kernel, but this run's backend is "
                f"{jax.default_backend()}; use 'xla' (or 'cudnn' on NVIDIA GPUs)."
            )
        tile = SPLASH_BLOCKS[-1]
        if config.data.max_length % tile:
            raise ConfigError(
                f"config.model.attention='splash' tiles sequences by {tile} tokens: "
                f"config.data.max_length={config.data.max_length} must be a multiple of {tile}."
            )
    if config.model.remat not in REMAT_POLICIES:
        raise ConfigError(
            f"config.model.remat={config.model.remat!r}: expected one of "
            f"{', '.join(REMAT_POLICIES)}."
        )
    model = from_pretrained(
        config.model.name_or_path,
        mesh=mesh,
        param_dtype=dtype_of(config.model.param_dtype, "config.model.param_dtype"),
        dtype=dtype_of(config.model.compute_dtype, "config.model.compute_dtype"),
        remat=config.model.remat,
        attention=config.model.attention,
        quantization=spec.quantization,
    )
    if spec.rank:
        tied = spec.for_model(model)
        if tied != spec:
            log.info("config.lora.trainable_modules: the LM head is tied to the embedding, so "
                     "the embedding matrix (model.embed_tokens) is trained")  # fmt: skip
        spec = tied
        apply_lora(model, spec, mesh, seed=config.train.seed)
    return model, spec, trainable_filter(spec)
