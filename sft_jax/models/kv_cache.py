"""The decoding cache (keys, values and positions of every layer, and the Gated DeltaNet
layers' states) and prefix tuning's per-layer key/value prefix, with the masks over them."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from sft_jax.models.config import ModelConfig
from sft_jax.models.linear_attention import LinearState


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ImageContext:
    """What T new tokens of an image-text model attend with beyond their positions
    (models/image_decoding.py): the positions their heads turn by ([B, T], or Qwen2.5-VL's
    M-RoPE [B, T, 3]), and Gemma 3's image groups of the queries [B, T] and of the cache slots
    [B, S] (tokens of one image attend to each other both ways), or None."""

    rope_positions: jax.Array
    query_groups_BxT: jax.Array | None = None
    key_groups_BxS: jax.Array | None = None


def cache_mask(
    positions_BxT: jax.Array,
    key_positions_BxS: jax.Array,
    window: int | None,
    images: ImageContext | None = None,
) -> jax.Array:
    """[B, T, S] True where query t may attend cache slot s: a real, earlier (or same) position
    (or a slot of the query's own image), inside the window. Padding and empty slots hold
    position -1 and are never attended."""
    distance_BxTxS = positions_BxT[:, :, None] - key_positions_BxS[:, None, :]
    allowed_BxTxS = distance_BxTxS >= 0
    if images is not None and images.query_groups_BxT is not None:
        query_BxTx1 = images.query_groups_BxT[:, :, None]
        same_image = (query_BxTx1 == images.key_groups_BxS[:, None, :]) & (query_BxTx1 > 0)
        allowed_BxTxS = allowed_BxTxS | same_image
    mask_BxTxS = (key_positions_BxS[:, None, :] >= 0) & allowed_BxTxS
    if window is not None:
        mask_BxTxS = mask_BxTxS & (distance_BxTxS < window)
    return mask_BxTxS


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVPrefix:
    """One layer's prefix: N key/value slots attended by every token (positions 0..N-1)."""

    keys_NxKxE: jax.Array
    values_NxKxE: jax.Array


def with_prefix(
    prefix: KVPrefix,
    keys_BxSxKxE: jax.Array,
    values_BxSxKxE: jax.Array,
    mask_BxTxS: jax.Array,
    positions_BxT: jax.Array,
    window: int | None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Keys, values [B, N + S, K, E] and mask [B, T, N + S] with the prefix slots first; a
    query at position p sees slot j < N where p - j is inside the window."""
    batch = keys_BxSxKxE.shape[0]
    count = prefix.keys_NxKxE.shape[0]

    def first(slots_NxKxE: jax.Array, rest_BxSxKxE: jax.Array) -> jax.Array:
        slots_BxNxKxE = jnp.broadcast_to(slots_NxKxE[None], (batch, *slots_NxKxE.shape))
        return jnp.concatenate([slots_BxNxKxE.astype(rest_BxSxKxE.dtype), rest_BxSxKxE], axis=1)

    distance_BxTxN = positions_BxT[:, :, None] - jnp.arange(count)[None, None, :]
    if window is None:
        prefix_mask_BxTxN = jnp.ones(distance_BxTxN.shape, bool)
    else:
        prefix_mask_BxTxN = distance_BxTxN < window
    mask_BxTxS = jnp.concatenate([prefix_mask_BxTxN, mask_BxTxS], axis=2)
    keys_BxSxKxE = first(prefix.keys_NxKxE, keys_BxSxKxE)
    return keys_BxSxKxE, first(prefix.values_NxKxE, values_BxSxKxE), mask_BxTxS


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Keys and values of every layer for the tokens written so far, slots [0, index)."""

    keys: tuple[jax.Array, ...]  # per layer [B, S, K, E]
    values: tuple[jax.Array, ...]  # per layer [B, S, K, E]
    positions_BxS: jax.Array  # int32 position of the token in each slot; -1: padding or empty
    index: jax.Array  # int32 scalar: the next slot to write
    # Per layer, a Gated DeltaNet's LinearState (its keys and values then hold no slots), or
    # None for an attention layer; () in a model without linear attention.
    states: tuple[LinearState | None, ...] = ()
    # Qwen2.5-VL: per row, what its decode positions add to turn by (models/image_decoding.py);
    # None when the prompts held no images.
    rope_delta_B: jax.Array | None = None

    @classmethod
    def empty(cls, config: ModelConfig, batch: int, length: int, dtype: jnp.dtype) -> KVCache:
        # A layer that shares another's keys/values (KV sharing) keeps no slots of its own, nor
        # does a Gated DeltaNet (Qwen3.5: its state instead); latent attention's value heads
        # (MLA) are v_head_dim wide.
        linear = [kind == "linear_attention" for kind in config.layer_types]

        def slots(layer: int, width: int) -> jax.Array:
            own = length if config.kv_source_of(layer) == layer and not linear[layer] else 0
            return jnp.zeros((batch, own, config.kv_heads_of(layer), width), dtype)

        layers = range(config.num_layers)
        keys = tuple(slots(i, config.head_dim_of(i)) for i in layers)
        values = keys
        if config.mla is not None:
            values = tuple(slots(i, config.value_head_dim) for i in layers)
        states = ()
        if any(linear):
            spec = config.linear_attention
            states = tuple(LinearState.empty(spec, batch, dtype) if f else None for f in linear)
        empty_BxS = jnp.full((batch, length), -1, jnp.int32)
        return cls(keys, values, empty_BxS, jnp.zeros((), jnp.int32), states)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerCache:
    """One layer's part of the KV cache while T new tokens are written at slot `index`."""

    keys_BxSxKxE: jax.Array
    values_BxSxKxE: jax.Array
    key_positions_BxS: jax.Array  # position of every slot, the new tokens' included
    index: jax.Array
    images: ImageContext | None = None  # an image-text model's (models/image_decoding.py)


def write_slots(cache_BxSx: jax.Array, new_BxTx: jax.Array, index: jax.Array) -> jax.Array:
    return jax.lax.dynamic_update_slice_in_dim(
        cache_BxSx, new_BxTx.astype(cache_BxSx.dtype), index, 1
    )
