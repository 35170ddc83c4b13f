"""The frozen weights a run starts from: a checkpoint loaded with the run's dtypes and QLoRA
quantization (MoE experts included), shared by the policy and a DPO reference model."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from jax.sharding import Mesh

from sft_jax.adapters.lora import LoRASpec
from sft_jax.core.spec import RunSpec
from sft_jax.models import CausalLM, from_pretrained
from sft_jax.models.config import DTYPES, ModelConfig
from sft_jax.models.moe import quantize_experts


def load_base_model(
    config: RunSpec,
    source: str | Path,
    mesh: Mesh,
    check: Callable[[ModelConfig], None],
    **runtime: Any,
) -> CausalLM:
    """`source` (safetensors only) on `mesh` in config.model's dtypes, quantized as config.lora
    asks; `check` sees the model's config before the experts are quantized (a refusal costs no
    quantizing). runtime: from_pretrained's other keywords (attention, score_labels...)."""
    quantization = LoRASpec.from_config(config.lora, config.train.steps).quantization
    model = from_pretrained(
        source,
        mesh=mesh,
        param_dtype=DTYPES[config.model.param_dtype],
        dtype=DTYPES[config.model.compute_dtype],
        quantization=quantization,
        **runtime,
    )
    check(model.config)
    if quantization is not None and model.config.num_experts:
        quantize_experts(model, quantization, mesh)
    return model
