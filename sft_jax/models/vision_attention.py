"""Bidirectional attention within groups of patches (Qwen2.5-VL's vision blocks), without a
[P, P] score matrix: within windows, chunk by chunk over the patches in window order; within
whole images, with the flash-style kernel of kernels/blockwise.py.

Windows (window order: each window a contiguous run of at most `chunk` patches) are cut into
chunks of `chunk` patches; a window's run then lies within two neighbouring chunks, so each
chunk's queries attend to the keys of the chunk before, itself and the chunk after, masked to
their own window: [P / chunk, chunk, 3 * chunk] scores, linear in P.

Dimension legend: B batch, P patches, N chunks, Q queries of a chunk, C keys of three chunks,
H heads, E head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sft_jax.models.kernels.blockwise import flash_attention
from sft_jax.models.layers import einsum_f32


def _neighbours(x_BxNxQx: jax.Array, fill: int) -> jax.Array:
    """[B, N, Q, ...] -> [B, N, 3Q, ...]: each chunk with the one before and after (fill at
    the ends)."""
    pad = [(0, 0), (1, 1)] + [(0, 0)] * (x_BxNxQx.ndim - 2)
    padded = jnp.pad(x_BxNxQx, pad, constant_values=fill)
    return jnp.concatenate([padded[:, :-2], x_BxNxQx, padded[:, 2:]], axis=2)


def window_attention(
    q_BxPxHxE: jax.Array,
    k_BxPxHxE: jax.Array,
    v_BxPxHxE: jax.Array,
    window_BxP: jax.Array,
    chunk: int,
    scale: float,
) -> jax.Array:
    """[B, P, H, E]: each patch attends to the patches of its window (window_BxP equal), the
    patches in window order, no window longer than `chunk`."""
    batch, patches, heads, head_dim = q_BxPxHxE.shape
    extra = -patches % chunk

    def chunks(x: jax.Array, fill: int = 0) -> jax.Array:
        x = jnp.pad(x, [(0, 0), (0, extra)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
        return x.reshape(batch, -1, chunk, *x.shape[2:])

    q_BxNxQxHxE = chunks(q_BxPxHxE)
    k_BxNxCxHxE = _neighbours(chunks(k_BxPxHxE), 0)
    v_BxNxCxHxE = _neighbours(chunks(v_BxPxHxE), 0)
    window_BxNxQ = chunks(window_BxP, -1)
    window_BxNxC = _neighbours(window_BxNxQ, -2)  # the ends' fill matches no query
    scores = einsum_f32("BNQHE,BNCHE->BNHQC", q_BxNxQxHxE, k_BxNxCxHxE) * scale
    same_BxNxQxC = window_BxNxQ[..., :, None] == window_BxNxC[..., None, :]
    scores = jnp.where(same_BxNxQxC[:, :, None], scores, -jnp.inf)
    weights = jax.nn.softmax(scores, axis=-1).astype(v_BxPxHxE.dtype)
    out_BxNxQxHxE = jnp.einsum("BNHQC,BNCHE->BNQHE", weights, v_BxNxCxHxE)
    return out_BxNxQxHxE.reshape(batch, -1, heads, head_dim)[:, :patches]


def group_attention(
    q_BxPxHxE: jax.Array,
    k_BxPxHxE: jax.Array,
    v_BxPxHxE: jax.Array,
    group_BxP: jax.Array,
    scale: float,
) -> jax.Array:
    """[B, P, H, E]: each patch attends to every patch of its group (its image), in any order:
    the blockwise kernel with every token at the same place (no causal mask)."""
    same_place = jnp.zeros(q_BxPxHxE.shape[1], jnp.int32)
    out_BxPxHx1xE = flash_attention(
        q_BxPxHxE[:, :, :, None],
        k_BxPxHxE,
        v_BxPxHxE,
        (group_BxP, group_BxP),
        (same_place, same_place),
        scale,
        None,
        None,
    )
    return out_BxPxHx1xE[:, :, :, 0]
