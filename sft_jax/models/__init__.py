"""Causal LMs in Flax NNX that load from and export to Hugging Face checkpoints.

Self-contained: nothing here imports from sft_jax outside models/ (but its errors). Adapters,
data, meshes and training sit above and import it.
"""

from sft_jax.core.errors import CheckpointError
from sft_jax.models.config import (
    DTYPES,
    SUPPORTED_MODEL_TYPES,
    ModelConfig,
    UnsupportedModelError,
    from_hf_config,
)
from sft_jax.models.decoder import CausalLM
from sft_jax.models.io.hf import from_pretrained, save_pretrained
from sft_jax.models.layers import TRAINABLE

__all__ = [
    "DTYPES",
    "SUPPORTED_MODEL_TYPES",
    "TRAINABLE",
    "CausalLM",
    "CheckpointError",
    "ModelConfig",
    "UnsupportedModelError",
    "from_hf_config",
    "from_pretrained",
    "save_pretrained",
]
