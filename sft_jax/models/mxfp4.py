"""MXFP4 storage of frozen kernels (QLoRA with lora.quantize="mxfp4"), as gpt-oss ships its
experts: a kernel [in, out] cut into blocks of 32 consecutive input rows per output column, each
block one E8M0 scale byte s (2 ** (s - 127)) and 32 FP4 E2M1 codes, two per byte (row 2b in the
low nibble, 2b + 1 in the high one): 17/32 byte per weight.

A block's scale is the least power of two 2 ** e with max |w| <= 6 * 2 ** e, and each weight the
nearest code of w / 2 ** e. Weights already MXFP4 on the same blocks (a gpt-oss checkpoint's
experts, dequantized as they load by io/mxfp4.py) come back exactly: a block whose largest code
is below 4 gets a smaller e, and doubling (or quadrupling) codes of at most 3 (1.5) gives codes.
Exponents stay within [-126, 126], so 2 ** e and 2 ** -e are normal floats built from their bits
(no denormals, which XLA flushes); a block of zeros stores s = 1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# The sixteen FP4 E2M1 values by 4-bit code: sign bit 3, then 0, 0.5, 1, 1.5, 2, 3, 4, 6.
FP4_E2M1 = np.array(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
    np.float32,
)
SCALE_BIAS = 127  # an E8M0 scale byte s means 2 ** (s - 127): float32's exponent field
BLOCK_VALUES = 32  # weights per scale
_LARGEST = 6.0
_MAX_EXPONENT = 126


def power_of_two(exponent: jax.Array) -> jax.Array:
    """2 ** exponent (int32 in [-126, 127]) in float32, exactly: the bits of its exponent."""
    bits = (exponent + SCALE_BIAS).astype(jnp.int32) << 23
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def quantize_mxfp4(kernel_IxO: jax.Array) -> dict[str, jax.Array]:
    """{"codes": uint8 [in / 2, out], "exponents": uint8 [in / 32, out]} of a kernel."""
    rows, out = kernel_IxO.shape
    blocks_NxBxO = kernel_IxO.astype(jnp.float32).reshape(rows // BLOCK_VALUES, BLOCK_VALUES, out)
    largest_NxO = jnp.max(jnp.abs(blocks_NxBxO), axis=1)
    # largest = m * 2 ** p, m in [0.5, 1): 6 * 2 ** e >= largest from e = p - 3 when m <= 0.75.
    mantissa, exponent = jnp.frexp(largest_NxO)
    exponent = jnp.where(mantissa <= 0.75, exponent - 3, exponent - 2)
    exponent = jnp.clip(
        jnp.where(largest_NxO == 0, -_MAX_EXPONENT, exponent), -_MAX_EXPONENT, _MAX_EXPONENT
    )
    scaled = blocks_NxBxO * power_of_two(-exponent)[:, None, :]
    magnitudes = jnp.asarray(FP4_E2M1[:8]).reshape(1, 1, 1, -1)
    distance = jnp.abs(jnp.abs(scaled)[..., None] - magnitudes)
    codes = jnp.argmin(distance, axis=-1).astype(jnp.uint8) | (
        jnp.signbit(scaled).astype(jnp.uint8) << 3
    )
    packed = codes[:, 0::2, :] | (codes[:, 1::2, :] << 4)
    return {
        "codes": packed.reshape(rows // 2, out),
        "exponents": (exponent + SCALE_BIAS).astype(jnp.uint8),
    }


def dequantize_mxfp4(stored: dict[str, jax.Array], dtype: jnp.dtype) -> jax.Array:
    """The kernel [in, out] back in `dtype` (each value exact in float32, then rounded)."""
    codes, exponents_NxO = stored["codes"], stored["exponents"]
    out = codes.shape[1]
    pairs = codes.reshape(-1, BLOCK_VALUES // 2, out)
    indices = jnp.stack([pairs & 0x0F, pairs >> 4], axis=2).reshape(-1, BLOCK_VALUES, out)
    values = jnp.asarray(FP4_E2M1)[indices.astype(jnp.int32)]
    scales_NxO = power_of_two(exponents_NxO.astype(jnp.int32) - SCALE_BIAS)
    return (values * scales_NxO[:, None, :]).reshape(-1, out).astype(dtype)
