"""Block-wise NF4 / int8 / MXFP4 storage of frozen kernels (QLoRA), dequantized in the matmul.

A kernel [in, out] is cut into blocks of `block` consecutive input rows per output column; each
block stores its absmax as a scale and its values as codes:
  nf4:  4-bit indices into the NF4 code book (two per byte), 0.5 byte per weight;
  int8: round(127 * w / absmax), 1 byte per weight;
  mxfp4: blocks of 32, FP4 E2M1 codes and a power-of-two scale byte, 17/32 byte per weight
         (gpt-oss's expert format, models/mxfp4.py; its scales are not double-quantized).
With double quantization the fp32 scales are themselves stored as int8 around their mean, with
one fp32 scale per group of up to 256 of them, which cuts their cost from 4/block to about
1/block bytes per weight.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sft_jax.core.errors import ConfigError
from sft_jax.models.mxfp4 import dequantize_mxfp4, quantize_mxfp4
from sft_jax.models.partitioning import named_sharding

# The 16 NF4 levels: quantiles of a standard normal rescaled to [-1, 1] (Dettmers et al. 2023).
NF4_CODE = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    np.float32,
)
FORMATS = ("nf4", "int8", "mxfp4")  # mxfp4: models/mxfp4.py (blocks of 32, E8M0 scales)
_SCALE_GROUP = 256


class QuantizedState(nnx.Variable):
    """Frozen quantized storage: never trained, never given optimizer state."""


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """How kernels are stored; config_check has checked the values."""

    format: str = "nf4"
    block: int = 64
    double_quant: bool = True


def _scale_groups(out: int) -> int:
    return _SCALE_GROUP if out % _SCALE_GROUP == 0 else out


def quantize(kernel_IxO: jax.Array, spec: QuantSpec) -> dict[str, jax.Array]:
    """Codes and scales of a kernel; see the module docstring for the layout."""
    rows, out = kernel_IxO.shape
    if rows % spec.block:
        raise ConfigError(
            f"config.lora.quant_block_size={spec.block}: a kernel with {rows} input rows does "
            f"not split into blocks of {spec.block}; use a divisor of {rows} (e.g. 64 or 32)."
        )
    if spec.format == "mxfp4":
        return quantize_mxfp4(kernel_IxO)
    blocks = kernel_IxO.astype(jnp.float32).reshape(rows // spec.block, spec.block, out)
    absmax_NxO = jnp.max(jnp.abs(blocks), axis=1)
    safe = jnp.where(absmax_NxO == 0, 1.0, absmax_NxO)[:, None, :]
    normalized = blocks / safe
    if spec.format == "nf4":
        distance = jnp.abs(normalized[..., None] - jnp.asarray(NF4_CODE).reshape(1, 1, 1, -1))
        indices = jnp.argmin(distance, axis=-1).astype(jnp.uint8)  # [N, block, O]
        codes = indices[:, 0::2, :] | (indices[:, 1::2, :] << 4)
        codes = codes.reshape(rows // 2, out)
    else:
        codes = jnp.round(normalized * 127).astype(jnp.int8).reshape(rows, out)
    stored = {"codes": codes}
    if spec.double_quant:
        mean = jnp.mean(absmax_NxO)
        centered = (absmax_NxO - mean).reshape(absmax_NxO.shape[0], -1, _scale_groups(out))
        group_absmax = jnp.max(jnp.abs(centered), axis=-1, keepdims=True)
        group_scale = jnp.where(group_absmax == 0, 1.0, group_absmax)
        scale_codes = jnp.round(centered / group_scale * 127).astype(jnp.int8)
        stored["scale_codes"] = scale_codes.reshape(absmax_NxO.shape)
        stored["scale_scales"] = group_scale[..., 0]
        stored["scale_mean"] = mean.reshape(1)
    else:
        stored["scales"] = absmax_NxO
    return stored


def block_scales(stored: dict[str, jax.Array]) -> jax.Array:
    """The fp32 absmax of every block, [in / block, out]."""
    if "scales" in stored:
        return stored["scales"]
    codes = stored["scale_codes"]
    blocks, out = codes.shape
    groups = stored["scale_scales"].shape[1]
    grouped = codes.reshape(blocks, groups, out // groups).astype(jnp.float32) / 127
    return (grouped * stored["scale_scales"][..., None]).reshape(blocks, out) + stored[
        "scale_mean"
    ][0]


def dequantize(stored: dict[str, jax.Array], spec: QuantSpec, dtype: jnp.dtype) -> jax.Array:
    """The kernel [in, out] back in `dtype`."""
    if spec.format == "mxfp4":
        return dequantize_mxfp4(stored, dtype)
    scales_NxO = block_scales(stored)
    codes = stored["codes"]
    out = codes.shape[1]
    if spec.format == "nf4":
        pairs = codes.reshape(-1, spec.block // 2, out)
        indices = jnp.stack([pairs & 0x0F, pairs >> 4], axis=2).reshape(-1, spec.block, out)
        normalized = jnp.asarray(NF4_CODE)[indices.astype(jnp.int32)]
    else:
        normalized = codes.reshape(-1, spec.block, out).astype(jnp.float32) / 127
    kernel = normalized * scales_NxO[:, None, :]
    return kernel.reshape(-1, out).astype(dtype)


def stored_bytes(stored: dict[str, jax.Array]) -> int:
    return sum(int(x.size) * x.dtype.itemsize for x in stored.values())


def stored_axes(name: str, axes: tuple[str, str]) -> tuple[str | None, ...]:
    """Logical axes of one stored array of a kernel with logical axes `axes`."""
    return {"scale_scales": (axes[0], None), "scale_mean": (None,)}.get(name, axes)


def quantize_structure(linears: Iterable[Any], spec: QuantSpec) -> None:
    """Replaces the kernel of each (abstract) Linear by abstract quantized storage, for the
    loader to fill."""
    for linear in linears:
        kernel = linear.kernel.get_value()
        stored = jax.eval_shape(
            lambda k: quantize(k, spec), jax.ShapeDtypeStruct(kernel.shape, kernel.dtype)
        )
        linear.quant = nnx.Dict(
            {
                k: QuantizedState(v, logical_axes=stored_axes(k, linear.axes))
                for k, v in stored.items()
            }
        )
        linear.quant_spec = spec
        linear.kernel = None


def quantized_kernel(
    kernel: jax.Array, spec: QuantSpec, axes: tuple[str, str], mesh: jax.sharding.Mesh
) -> dict[str, jax.Array]:
    """Quantizes one loaded kernel on its devices, straight into its stored shardings."""
    return _quantizer(kernel.shape, kernel.dtype, kernel.sharding, spec, axes, mesh)(kernel)


@functools.lru_cache(maxsize=64)
def _quantizer(shape, dtype, in_sharding, spec: QuantSpec, axes, mesh: jax.sharding.Mesh) -> Any:
    """A compiled quantize for one kernel shape and layout (layers share it)."""
    quantize_with = functools.partial(quantize, spec=spec)
    shapes = jax.eval_shape(quantize_with, jax.ShapeDtypeStruct(shape, dtype))
    out = {k: named_sharding(stored_axes(k, axes), v.shape, mesh) for k, v in shapes.items()}
    return jax.jit(quantize_with, in_shardings=in_sharding, out_shardings=out)
