"""The model a run trains, built from its config: loaded, optionally quantized, with adapters."""

from __future__ import annotations

import logging
from typing import Any

import jax
import jax.extend
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from sft_jax.errors import ConfigError
from sft_jax.lora import LoRASpec, apply_lora, trainable_filter
from sft_jax.models import CausalLM, ModelConfig, from_hf_config, from_pretrained
from sft_jax.models.decoder import (
    ATTENTION_KINDS,
    SPLASH_BLOCKS,
    SPLASH_INTERPRET,
    packed_cudnn_supported,
)
from sft_jax.models.hf_io import load_hf_config, resolve_model_dir

log = logging.getLogger(__name__)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def dtype_of(name: str, field: str) -> Any:
    if name not in DTYPES:
        raise ConfigError(f"{field}={name!r}: expected one of {', '.join(DTYPES)}.")
    return DTYPES[name]


ATTENTION_CHOICES = ("auto", *ATTENTION_KINDS)
CUDNN_DTYPES = ("bfloat16",)  # cuDNN's flash attention takes 16-bit inputs only


def accelerator() -> str:
    """'nvidia' (CUDA GPUs), 'tpu', or the backend's name (cpu, rocm GPUs, ...)."""
    backend = jax.extend.backend.get_backend()
    if backend.platform == "gpu" and "cuda" in backend.platform_version.lower():
        return "nvidia"
    return backend.platform


def cudnn_max_head_dim() -> int:
    """cuDNN flash attention's largest head dim on this GPU: 256 from Hopper on, else 128."""
    try:
        return 256 if int(str(jax.devices()[0].compute_capability).split(".")[0]) >= 9 else 128
    except (AttributeError, ValueError):
        return 128


def choose_attention(
    requested: str,
    *,
    accelerator: str,
    model: ModelConfig,
    compute_dtype: str,
    max_length: int,
    max_head_dim: int = 256,
) -> tuple[str, str]:
    """(attention kind, why): "auto" takes the fused kernel of this accelerator where the model
    and config allow it (cuDNN on NVIDIA GPUs, splash on TPUs), else the einsum path. Naming a
    kernel the run cannot use is a ConfigError that says why."""
    if requested not in ATTENTION_CHOICES:
        raise ConfigError(
            f"config.model.attention={requested!r}: expected one of {', '.join(ATTENTION_CHOICES)}."
        )
    cudnn_blocker = (
        f"this run's accelerator is {accelerator}, not an NVIDIA GPU"
        if accelerator != "nvidia"
        else f"config.model.compute_dtype={compute_dtype!r} (cuDNN takes bfloat16)"
        if compute_dtype not in CUDNN_DTYPES
        else f"{model.model_type} soft-caps attention logits, which cuDNN cannot"
        if model.attn_logit_softcap is not None
        else f"head_dim {model.head_dim} is not a multiple of 8 up to {max_head_dim} (this GPU)"
        if model.head_dim % 8 or model.head_dim > max_head_dim
        else ""
    )
    tile = SPLASH_BLOCKS[-1]
    splash_blocker = (
        f"this run's accelerator is {accelerator}, not a TPU"
        if accelerator != "tpu" and not SPLASH_INTERPRET["interpret"]
        else f"config.data.max_length={max_length} is not a multiple of its {tile}-token tile"
        if max_length % tile
        else ""
    )
    if requested == "auto":
        if accelerator == "nvidia" and not cudnn_blocker:
            return "cudnn", "auto: fused cuDNN attention on this NVIDIA GPU"
        if accelerator == "tpu" and not splash_blocker:
            return "splash", "auto: Pallas splash attention on this TPU"
        blocker = {"nvidia": cudnn_blocker, "tpu": splash_blocker}.get(accelerator)
        why = (
            f"not the fused kernel, as {blocker}"
            if blocker
            else f"no fused kernel on {accelerator}"
        )
        return "xla", f"auto: {why}"
    blocker = {"cudnn": cudnn_blocker, "splash": splash_blocker}.get(requested, "")
    if blocker:
        other = "set it to 'auto' or 'xla'"
        raise ConfigError(f"config.model.attention={requested!r} cannot run: {blocker}; {other}.")
    return requested, "as configured"


def segments_bound(data: ml_collections.ConfigDict) -> int:
    """Most segments a row of batches built from this config can hold (documents, plus padding
    as one more), or 0 when unbounded. The data pipeline knows a tighter bound for its data."""
    if not data.packing:
        return 2
    documents = data.get("max_documents_per_row", 0)  # configs saved before the field: none
    return documents + 1 if documents > 0 else 0


def build_model(
    config: ml_collections.ConfigDict, mesh: Mesh, max_segments: int | None = None
) -> tuple[CausalLM, LoRASpec, Any]:
    """(model on the mesh, its LoRA spec, the filter of what training updates).

    max_segments: most segments in a row of the batches it will see (see ModelConfig); by
    default the bound of config.data."""
    spec = LoRASpec.from_config(config.lora)
    model_config = from_hf_config(load_hf_config(resolve_model_dir(config.model.name_or_path)))
    attention, why = choose_attention(
        config.model.attention,
        accelerator=accelerator(),
        model=model_config,
        compute_dtype=config.model.compute_dtype,
        max_length=config.data.max_length,
        max_head_dim=cudnn_max_head_dim() if accelerator() == "nvidia" else 256,
    )
    if max_segments is None:
        max_segments = segments_bound(config.data)
    if attention == "cudnn":
        why += (
            f"; documents kept apart by a table of {max_segments} segments per row"
            if max_segments and packed_cudnn_supported()
            else "; documents kept apart by a [B, 1, T, S] mask (the segment table needs a "
            "Hopper GPU and a bound on config.data.max_documents_per_row)"
        )
    log.info("attention: %s (%s)", attention, why)
    model = from_pretrained(
        config.model.name_or_path,
        mesh=mesh,
        param_dtype=dtype_of(config.model.param_dtype, "config.model.param_dtype"),
        dtype=dtype_of(config.model.compute_dtype, "config.model.compute_dtype"),
        remat="none" if config.model.remat == "auto" else config.model.remat,  # auto: trainer
        attention=attention,
        max_segments=max_segments,
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
