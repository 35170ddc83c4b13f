"""The planner's account of an image-text model's vision part. The compiled step already holds
it (the vision tower's weights among the state, the rows' image fields at config.data's image
budget among the batch, the tower's activations among the temporaries: estimate.py compiles
with setup.image_options); here: its model FLOPs in the step's (train/vision_flops.py) and the
lines `python -m sft_jax.plan` prints of it: its parameters' bytes whole and per device (split
by the decoder's rules, models/partitioning.py), what of it trains, the image fields a row
carries and their bytes."""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from sft_jax.core.spec import RunSpec
from sft_jax.models.io.gemma3_vision import is_gemma3
from sft_jax.models.layers import LoRAParam
from sft_jax.objectives import registry
from sft_jax.train import sharding
from sft_jax.train.flops import training_flops_per_token
from sft_jax.train.setup import image_options
from sft_jax.train.vision_flops import forward_flops_per_row, passes, vision_flops_per_token

VISION = nnx.All(nnx.Param, nnx.Not(LoRAParam), nnx.PathContains("vision"))  # its weights


def planned_flops_per_token(
    config: RunSpec, model: Any, trainable: Any, adapters: int | None
) -> float:
    """Model FLOPs per token of the planned step: the decoder's (adapters: the trained
    parameters where the base is frozen) and the vision part's on config.data's image budget."""
    seq_len = registry.row_length(config)
    images = image_options(config, model.config).get("images", ())
    trained = nnx.to_pure_dict(nnx.state(model, trainable))
    decoder = training_flops_per_token(model.config, seq_len, adapters)
    return decoder + vision_flops_per_token(model.config, seq_len, images, trained)


def _bytes(tree: Any, per_device: bool) -> int:
    """Bytes of a tree of abstract arrays, whole or one device's shards (their shardings)."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if per_device else x.shape
        total += math.prod(shape) * np.dtype(x.dtype).itemsize
    return total


def _size(count: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= scale:
            return f"{count / scale:.3g} {unit}"
    return f"{count:.0f} B"


def report(config: RunSpec, model: Any, trainable: Any, mesh: Mesh, name: str) -> list[str]:
    """The vision part's lines of the plan on `mesh` (called `name`: DxFxT); none for a text
    model."""
    if model.vision is None:
        return []
    params = sharding.abstract_params(model, mesh, VISION)
    count = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    trained = nnx.to_pure_dict(nnx.state(model, nnx.All(trainable, nnx.PathContains("vision"))))
    adapters = sum(x.size for x in jax.tree.leaves(trained)) if passes(trained) == 2 else 0
    mode = {1: "frozen", 2: f"frozen, {adapters:,} in adapters", 3: "trained"}[passes(trained)]
    family = "Gemma 3 SigLIP tower + projector" if is_gemma3(model.config) else "Qwen2.5-VL ViT"
    images = dict(image_options(config, model.config).get("images", ()))
    rows = config.train.global_batch_size
    fields = ", ".join(f"{field} {shape}" for field, shape in images.items() if shape)
    field_bytes = sum(rows * math.prod(shape) * 4 for shape in images.values() if shape)
    per_row = forward_flops_per_row(model.config, images)
    return [
        f"vision: {family}, {count:,} parameters ({mode}): {_size(_bytes(params, False))}, "
        f"{_size(_bytes(params, True))} per device on mesh {name} (split as the "
        "decoder: embed over fsdp, heads and mlp over tensor); its activations are in the "
        "step's temporaries",
        f"vision: image fields per row {fields} (float32 or int32: {_size(field_bytes)} a "
        f"batch of {rows} rows); forward {per_row / 1e9:.3g} GFLOP per row, "
        f"x{passes(trained)} in the model FLOPs",
    ]
