"""gpt-oss's checkpoint layout: attention sinks, a router with a bias, and the experts stored
fused as transformers' GptOssExperts holds them (no per-expert tensors):

  model.layers.L.mlp.experts.gate_up_proj       [X, D, 2F]  gate in even columns, up in odd
  model.layers.L.mlp.experts.gate_up_proj_bias  [X, 2F]     the same interleaving
  model.layers.L.mlp.experts.down_proj          [X, F, D]   as ours ([in, out], not transposed)
  model.layers.L.mlp.experts.down_proj_bias     [X, D]
  model.layers.L.mlp.router.weight [X, D], .bias [X];  model.layers.L.self_attn.sinks [H]

The gate and up halves load into experts_gate / experts_up (and their biases) and are
interleaved again on export, so transformers reloads our export as is.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jax
import numpy as np

from sft_jax.models.config import ModelConfig
from sft_jax.models.io import safetensors as safetensors_io

# Our parameter -> (checkpoint tensor under mlp.experts, column offset in the interleaving).
_INTERLEAVED = {
    "experts_gate": ("gate_up_proj", 0),
    "experts_up": ("gate_up_proj", 1),
    "experts_gate_bias": ("gate_up_proj_bias", 0),
    "experts_up_bias": ("gate_up_proj_bias", 1),
}
# Our parameter -> (checkpoint name under the layer, stored transposed).
_PLAIN = {
    "sinks": ("self_attn.sinks", False),
    "router": ("mlp.router.weight", True),
    "router_logit_bias": ("mlp.router.bias", False),
    "experts_down": ("mlp.experts.down_proj", False),
    "experts_down_bias": ("mlp.experts.down_proj_bias", False),
}


def _is_gpt_oss(path: tuple[Any, ...], config: ModelConfig) -> bool:
    return config.expert_names == "gpt_oss" and len(path) >= 3 and path[0] == "layers"


def tensor_name(path: tuple[Any, ...], config: ModelConfig) -> tuple[str, bool] | None:
    """(checkpoint name, stored transposed) of a gpt-oss parameter without a per-expert or
    interleaved layout: sinks, router, down projection; None for any other parameter."""
    if not _is_gpt_oss(path, config) or path[-1] not in _PLAIN:
        return None
    name, transposed = _PLAIN[path[-1]]
    return f"model.layers.{path[1]}.{name}", transposed


def interleaved(path: tuple[Any, ...], config: ModelConfig) -> tuple[str, int] | None:
    """(checkpoint name, column offset) of a gate or up half (weights or bias), else None."""
    if not _is_gpt_oss(path, config) or path[-1] not in _INTERLEAVED:
        return None
    name, offset = _INTERLEAVED[path[-1]]
    return f"model.layers.{path[1]}.mlp.experts.{name}", offset


def load_interleaved(
    entry: safetensors_io.TensorEntry,
    offset: int,
    target: jax.ShapeDtypeStruct,
    param_sharding: jax.sharding.Sharding,
) -> jax.Array:
    """The gate (offset 0) or up (offset 1) half [X, (D,) F] of a fused tensor [X, (D,) 2F]:
    every device reads the experts and the columns it holds, every other one from `offset`."""
    shape = target.shape

    def read(index: tuple[slice, ...]) -> np.ndarray:
        ranges = [range(n)[i] for i, n in zip(index, shape, strict=True)]
        box = [slice(r.start, r.stop) for r in ranges[:-1]]
        columns = slice(2 * ranges[-1].start, 2 * ranges[-1].stop)
        return entry.read((*box, columns))[..., offset::2].astype(target.dtype)

    return jax.make_array_from_callback(shape, param_sharding, read).block_until_ready()


def interleaved_tensors(
    model: Any, path: tuple[Any, ...], out_dtype: np.dtype | None, to_host: Any
) -> Iterator[safetensors_io.PendingTensor]:
    """The fused tensor of a gate half (gate and up interleaved again); nothing for an up half,
    which the gate's tensor carries."""
    name, offset = interleaved(path, model.config)
    if offset:
        return
    block = model.layers[path[1]].mlp
    gate = getattr(block, path[-1])[...]
    up = getattr(block, path[-1].replace("gate", "up"))[...]
    dtype = np.dtype(out_dtype or gate.dtype)
    shape = (*gate.shape[:-1], 2 * gate.shape[-1])

    def produce() -> np.ndarray:
        fused = np.empty(shape, dtype)
        fused[..., 0::2] = to_host(gate).astype(dtype)
        fused[..., 1::2] = to_host(up).astype(dtype)
        return fused

    yield safetensors_io.PendingTensor(name, shape, dtype, produce)
