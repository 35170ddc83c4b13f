"""Causal LMs in Flax NNX that load from and export to Hugging Face checkpoints."""

from sft_jax.models.config import (
    SUPPORTED_MODEL_TYPES,
    ModelConfig,
    UnsupportedModelError,
    from_hf_config,
)
from sft_jax.models.decoder import CausalLM
from sft_jax.models.hf_io import CheckpointError, from_pretrained, save_pretrained

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "CausalLM",
    "CheckpointError",
    "ModelConfig",
    "UnsupportedModelError",
    "from_hf_config",
    "from_pretrained",
    "save_pretrained",
]
