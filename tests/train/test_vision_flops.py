"""The vision part's model FLOPs (train/vision_flops.py) against XLA's cost analysis of the
compiled forward of the SigLIP tower + projector (Gemma 3) and the Qwen2.5-VL ViT + merger, at
widths where the uncounted elementwise work (norms, softmax, GELU) is a few percent; and the
passes a step spends on it (frozen, adapters, trained)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sft_jax.models.gemma3_vision import Gemma3Vision
from sft_jax.models.gemma3_vision_config import VisionSpec as Gemma3VisionSpec
from sft_jax.models.qwen_vision import QwenVision
from sft_jax.models.qwen_vl_config import VisionSpec as QwenVisionSpec
from sft_jax.models.qwen_vl_rows import IMAGE_IDS, PATCHES, POSITIONS, WINDOW_IDS, WINDOW_ORDER
from sft_jax.train import vision_flops


def _xla_flops(module: nnx.Module, call, *inputs: jax.ShapeDtypeStruct) -> float:
    """XLA's FLOPs of call(module, *inputs), compiled from shapes alone."""
    graphdef, state = nnx.split(module)

    def forward(state, *args):
        return call(nnx.merge(graphdef, state), *args)

    cost = jax.jit(forward).lower(state, *inputs).compile().cost_analysis()
    return float((cost[0] if isinstance(cost, list) else cost)["flops"])


def test_gemma3_tower_and_projector_flops_equal_xla():
    spec = Gemma3VisionSpec(
        hidden_size=256,
        intermediate_size=1024,
        num_layers=2,
        num_heads=4,
        num_channels=3,
        image_size=64,
        patch_size=4,
        layer_norm_eps=1e-6,
        tokens_per_image=16,
        image_token_id=5,
    )
    text_width, images = 512, 2
    vision = nnx.eval_shape(
        lambda: Gemma3Vision(
            spec, text_width, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0)
        )
    )
    pixels = jax.ShapeDtypeStruct((images, 3, 64, 64), jnp.float32)
    xla = _xla_flops(vision, lambda v, p: v.soft_tokens(p), pixels)
    ours = images * vision_flops.gemma3_image_flops(spec, text_width)
    row = vision_flops.forward_flops_per_row(
        type("Config", (), {"vision": spec, "hidden_size": text_width}),
        {"pixel_values": (images, 3, 64, 64)},
    )
    assert row == ours
    assert abs(ours / xla - 1) < 0.03, (ours, xla)


@pytest.mark.parametrize("full_blocks", [(), (1,)])
def test_qwen_vit_and_merger_flops_equal_xla(full_blocks):
    spec = QwenVisionSpec(
        depth=2,
        hidden_size=512,
        intermediate_size=1024,
        num_heads=8,
        in_channels=3,
        patch_size=4,
        temporal_patch_size=2,
        spatial_merge_size=2,
        window_size=16,
        out_hidden_size=256,
        fullatt_block_indexes=full_blocks,
        rope_theta=1e4,
        activation="silu",
        image_token_id=5,
    )
    rows, patches = 1, 64
    vision = nnx.eval_shape(
        lambda: QwenVision(spec, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    )
    index = jax.ShapeDtypeStruct((rows, patches), jnp.int32)
    images = {
        PATCHES: jax.ShapeDtypeStruct((rows, patches, spec.patch_dim), jnp.float32),
        POSITIONS: jax.ShapeDtypeStruct((rows, patches, 2), jnp.int32),
        WINDOW_IDS: index,
        WINDOW_ORDER: index,
        IMAGE_IDS: index,
    }
    xla = _xla_flops(vision, lambda v, i: v(i), images)
    ours = rows * vision_flops.qwen_row_flops(spec, patches)
    assert abs(ours / xla - 1) < 0.03, (ours, xla)


def test_passes_follow_what_trains():
    lora = {"vision": {"tower": {"q_proj": {"lora_a": np.zeros(2), "lora_b": np.zeros(2)}}}}
    full = {"vision": {"tower": {"q_proj": {"kernel": np.zeros(2)}}}}
    text = {"layers": {0: {"q_proj": {"kernel": np.zeros(2)}}}}
    assert [vision_flops.passes(t) for t in (text, lora, full)] == [1, 2, 3]
