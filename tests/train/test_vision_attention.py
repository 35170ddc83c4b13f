"""attention='auto' for Gemma 3 with images: the einsum path ('xla'), the only kernel that masks
image tokens attending both ways within their image, with the reason logged; naming a fused
kernel is refused; the planner plans the same kernel."""

from __future__ import annotations

import dataclasses

import pytest
from test_gemma3_vision import tiny_config, tiny_processor

from configs import base
from sft_jax.core.errors import ConfigError
from sft_jax.core.spec import RunSpec
from sft_jax.models import from_hf_config
from sft_jax.planning import estimate
from sft_jax.train import kernel_choice


@pytest.fixture
def on_nvidia(monkeypatch):
    """A bfloat16 run on an NVIDIA GPU, where 'auto' would take cuDNN for a text model."""
    monkeypatch.setattr(kernel_choice, "accelerator", lambda: "nvidia")
    config = base.get_config()
    config.model.compute_dtype = "bfloat16"
    return config


def test_auto_takes_the_einsum_path_for_gemma3_with_images(on_nvidia):
    model = from_hf_config(tiny_config(tiny_processor().tokenizer))
    text = dataclasses.replace(model, vision=None)
    assert kernel_choice.attention_for(RunSpec.of(on_nvidia), text, 0)[0] == "cudnn"
    attention, why = kernel_choice.attention_for(RunSpec.of(on_nvidia), model, 0)
    assert attention == "xla" and "image tokens attend both ways" in why
    planned, line = estimate.planned_attention(RunSpec.of(on_nvidia), model, "nvidia")
    assert planned == "xla" and "image tokens" in line
    on_nvidia.model.attention = "xla"
    assert kernel_choice.attention_for(RunSpec.of(on_nvidia), model, 0) == ("xla", "as configured")
    on_nvidia.model.attention = "cudnn"
    with pytest.raises(ConfigError, match="attention='cudnn' cannot run Gemma 3 with images"):
        kernel_choice.attention_for(RunSpec.of(on_nvidia), model, 0)
