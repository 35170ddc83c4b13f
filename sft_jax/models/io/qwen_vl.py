"""Qwen2.5-VL's vision tensors in the hub's layout (`visual.*`; transformers 5 saves them as
`model.visual.*`, which fixed_names.text_model_tensors reads as `visual.*`): their names, and
the patch embedding, stored as the 3-D convolution's weight [C_out, C_in, Tp, p, p] and held as
a matmul kernel [C_in*Tp*p*p, C_out] over the processor's flattened patches."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from sft_jax.models.io import safetensors as safetensors_io

PATCH_EMBED = ("vision", "patch_embed", "kernel")
_PATCH_EMBED_NAME = "visual.patch_embed.proj.weight"
# Path inside the vision part -> its module name under visual. (the merger's Sequential).
_MODULES = {"fc1": "mlp.0", "fc2": "mlp.2"}


def tensor_name(path: tuple[Any, ...]) -> tuple[str, bool] | None:
    """(tensor name, stored transposed) of a vision parameter, None for any other (and for the
    patch embedding, which load_patch_embed and patch_embed_tensor handle)."""
    if path[0] != "vision" or path == PATCH_EMBED:
        return None
    *modules, leaf = path[1:]
    name = ".".join(_MODULES.get(str(m), str(m)) for m in modules)
    if leaf == "kernel":
        return f"visual.{name}.weight", True
    return f"visual.{name}.{'bias' if leaf == 'bias' else 'weight'}", False


def load_patch_embed(
    entries: dict[str, safetensors_io.TensorEntry],
    target: jax.ShapeDtypeStruct,
    param_sharding: jax.sharding.Sharding,
    error: Callable[[str], Exception],
) -> tuple[jax.Array, str]:
    """(the kernel [patch_dim, C] from the convolution's weight, the tensor's name)."""
    entry = entries.get(_PATCH_EMBED_NAME)
    if entry is None:
        raise error(f"tensor {_PATCH_EMBED_NAME} is missing from the checkpoint.")
    patch_dim, width = target.shape
    if entry.shape[0] != width or int(np.prod(entry.shape[1:])) != patch_dim:
        raise error(
            f"{entry.path.name}: tensor {_PATCH_EMBED_NAME} has shape {entry.shape}, but "
            f"config.json implies ({width}, {patch_dim} values per patch)."
        )
    kernel = entry.read().reshape(width, patch_dim).T.astype(target.dtype)
    return jax.device_put(kernel, param_sharding).block_until_ready(), _PATCH_EMBED_NAME


def patch_embed_tensor(
    array: jax.Array, spec: Any, out_dtype: np.dtype | None, to_host: Callable
) -> safetensors_io.PendingTensor:
    """The kernel back as the convolution's weight [C_out, C_in, Tp, p, p]."""
    dtype = np.dtype(out_dtype or array.dtype)
    shape = (
        spec.hidden_size,
        spec.in_channels,
        spec.temporal_patch_size,
        spec.patch_size,
        spec.patch_size,
    )

    def produce() -> np.ndarray:
        return np.ascontiguousarray(to_host(array).astype(dtype).T.reshape(shape))

    return safetensors_io.PendingTensor(_PATCH_EMBED_NAME, shape, dtype, produce)
