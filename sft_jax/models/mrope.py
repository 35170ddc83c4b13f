"""Rotary angles over several position axes: Qwen2.5-VL's multimodal RoPE (M-RoPE) in the
language model and the 2-D RoPE over (row, column) in its vision blocks.

Each frequency pair of a head turns by the position along one axis: `section` gives how many
consecutive pairs follow each axis (M-RoPE: temporal, height, width, e.g. (16, 24, 24) of 64
pairs; the vision blocks: (E/4, E/4) pairs for row and column). Text tokens carry the same
position on all three axes, so M-RoPE turns them as 1-D RoPE does.

Dimension legend: B batch, T time, A position axes, E head dim (E/2 frequency pairs).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def sectioned_angles(
    positions_BxTxA: jax.Array, inv_freq: jax.Array, section: tuple[int, ...]
) -> jax.Array:
    """float32 angles [B, T, E/2]: pair i turns by positions[..., axis(i)] * inv_freq[i], where
    the first section[0] pairs follow axis 0, the next section[1] axis 1, and so on."""
    if sum(section) != inv_freq.shape[0] or positions_BxTxA.shape[-1] != len(section):
        raise ValueError(
            f"RoPE sections {section} do not fit {inv_freq.shape[0]} frequency pairs and "
            f"positions of {positions_BxTxA.shape[-1]} axes."
        )
    axis_of_pair = np.repeat(np.arange(len(section)), section)
    positions_BxTxHalf = jnp.take(positions_BxTxA, axis_of_pair, axis=-1).astype(jnp.float32)
    return positions_BxTxHalf * inv_freq.astype(jnp.float32).reshape(1, 1, -1)


def rotate(x_BxTxHxE: jax.Array, angles_BxTxHalf: jax.Array) -> jax.Array:
    """Rotates the two halves of each head (transformers' rotate_half) by the angles, in float32,
    back in x's dtype."""
    half = x_BxTxHxE.shape[-1] // 2
    cos = jnp.cos(angles_BxTxHalf)[:, :, None, :]
    sin = jnp.sin(angles_BxTxHalf)[:, :, None, :]
    x32 = x_BxTxHxE.astype(jnp.float32)
    first, second = x32[..., :half], x32[..., half:]
    rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    return rotated.astype(x_BxTxHxE.dtype)
