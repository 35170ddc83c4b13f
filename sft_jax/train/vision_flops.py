"""Model FLOPs of an image-text model's vision part per step (added to the decoder's for MFU).

The compiled step runs the vision part on every row's image arrays at their compiled shapes
(Gemma 3: max_images_per_row image slots of P = (image_size / patch_size)^2 patches each;
Qwen2.5-VL: the row's patch budget, max_image_patches_per_row), empty slots and padding
included, as the text's FLOPs count every token of a row. Forward, per patch:
  2 x the matmul parameters a patch runs through (patch embedding, each layer's attention
  projections and MLP), 4 x span x width per layer for the scores and values (bidirectional:
  no causal halving), span the patches a patch attends to (Gemma 3: its image; Qwen2.5-VL:
  its window in windowed blocks, the row's patch budget in full blocks, as packed text counts
  the whole row); plus the projector per output token (Gemma 3's projection per soft token,
  Qwen2.5-VL's merger per 2 x 2 patches). Norms, pooling, softmax and RoPE are not counted.

Backward: the vision part's inputs are pixels and nothing before it trains, so
  frozen (model.train_vision=False, no vision adapters): forward only (1 pass): its outputs
    depend on no differentiated variable, so autodiff builds no backward through it at all;
  adapters on it (lora.vision_targets): the base's forward and input gradients (2 passes:
    the gradient flows back through the frozen layers to reach the adapters; counted over the
    whole tower, an upper bound where only late layers or the projector are adapted, and the
    first layer's input gradient is counted though not needed), the adapters' own matmuls not
    counted (rank r << width);
  trained in full (model.train_vision=True): forward, input and weight gradients (3 passes).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax

from sft_jax.models.gemma3_images import PIXEL_VALUES
from sft_jax.models.gemma3_vision_config import VisionSpec as Gemma3VisionSpec
from sft_jax.models.qwen_vl_config import VisionSpec as QwenVisionSpec
from sft_jax.models.qwen_vl_rows import PATCHES
from sft_jax.train.flops import training_flops_per_token


def gemma3_image_flops(spec: Gemma3VisionSpec, text_width: int) -> float:
    """Forward FLOPs of the SigLIP tower and projector on one image."""
    patches, width = spec.patches_per_side**2, spec.hidden_size
    embed = spec.num_channels * spec.patch_size**2 * width
    layer = 4 * width * width + 2 * width * spec.intermediate_size
    attention = 4 * patches * width  # per patch per layer: q.k and p.v over the image
    tower = patches * (2 * embed + spec.num_layers * (2 * layer + attention))
    return tower + spec.tokens_per_image * 2 * spec.hidden_size * text_width


def qwen_row_flops(spec: QwenVisionSpec, patches: int) -> float:
    """Forward FLOPs of the ViT and merger on one row of `patches` patches (its budget)."""
    width = spec.hidden_size
    layer = 4 * width * width + 3 * width * spec.intermediate_size
    window = spec.window_units**2 * spec.merge_unit  # patches of a full window
    full = len(spec.fullatt_block_indexes)
    attention = 4 * width * ((spec.depth - full) * window + full * patches)  # per patch
    merged = spec.merge_unit * width
    merger = (patches // spec.merge_unit) * 2 * (merged * merged + merged * spec.out_hidden_size)
    blocks = patches * (2 * spec.patch_dim * width + spec.depth * 2 * layer + attention)
    return blocks + merger


def forward_flops_per_row(config: Any, images: Mapping[str, tuple[int, ...]]) -> float:
    """Forward FLOPs of the vision part on one row's image arrays (field -> per-row shape,
    DataSource.images); 0 for a text model or rows without images."""
    spec = config.vision
    if spec is None or not images:
        return 0.0
    if isinstance(spec, Gemma3VisionSpec):
        slots = images[PIXEL_VALUES][0]
        return slots * gemma3_image_flops(spec, config.hidden_size)
    return qwen_row_flops(spec, images[PATCHES][0])


def passes(trained: Any) -> int:
    """Forward-pass equivalents the step spends on the vision part, from the trained
    parameters' state (see the module docstring): 1 frozen, 2 with adapters, 3 trained."""
    paths = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(trained)]
    vision = [path for path in paths if "'vision'" in path]
    if not vision:
        return 1
    return 2 if all("'lora_" in path for path in vision) else 3


def vision_flops_per_token(config: Any, seq_len: int, images: Any, trained: Any) -> float:
    """The vision part's training FLOPs per token of a row (rows * seq_len tokens a step):
    forward FLOPs per row times passes(trained), over seq_len."""
    per_row = forward_flops_per_row(config, dict(images or ()))
    return per_row * passes(trained) / seq_len if per_row else 0.0


def step_flops_per_token(
    config: Any, data: Any, trained: Any, adapted: bool, objective: Any
) -> float:
    """Model FLOPs per token of a train step (what MFU divides by peak): the decoder's
    (train/flops.training_flops_per_token; with adapters the base is frozen and the trained
    parameters count apart; a DPO reference adds its forward passes, objectives without one
    have no reference_forwards) plus the vision part's on the DataSource's image arrays."""
    adapters = sum(x.size for x in jax.tree.leaves(trained)) if adapted else None
    reference_forwards = getattr(objective, "reference_forwards", 0)
    decoder = training_flops_per_token(config, data.seq_len, adapters, reference_forwards)
    return decoder + vision_flops_per_token(config, data.seq_len, data.images, trained)
