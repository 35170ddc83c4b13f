"""Generation with images: what `CausalLM.extend` adds for an image-text model's prompts.

The prefill places the prompts' images in the token embeddings exactly as `forward` does
(models/vision.place_images, each left-padded row one document: segment 1 on its real tokens)
and attends with an `ImageContext` (models/kv_cache.py):

  Gemma 3     the image tokens of the prompt attend both ways within their image (the image
              groups of the new tokens, written into the slots they take), the rest causally;
              decode steps are causal, as transformers' generate does after its first step.
  Qwen2.5-VL  the prefill turns by the M-RoPE positions [B, T, 3]; each row's rope delta
              (transformers' `rope_deltas`: the largest M-RoPE position of its prompt + 1 - its
              length) is kept in the cache, and every later token turns by its sequence
              position + the delta on all three axes. Example: a prompt a b I I I I c (an
              image of 2 x 2 merged tokens) has M-RoPE positions up to 4 over 7 tokens, so
              delta = 4 + 1 - 7 = -2 and the first new token (position 7) turns by 5.

The cache's positions (what the mask reads: causality, windows, padding) stay the sequence
positions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sft_jax.models.kv_cache import ImageContext, KVCache, write_slots
from sft_jax.models.vision import place_images


def rope_deltas(rope_positions_BxTxA: jax.Array, positions_BxT: jax.Array) -> jax.Array:
    """[B] int32: each row's largest M-RoPE position over its real tokens + 1 - its length
    (0 for a text-only row, whose M-RoPE positions are its positions)."""
    real_BxTx1 = (positions_BxT >= 0)[:, :, None]
    top_B = jnp.max(jnp.where(real_BxTx1, rope_positions_BxTxA, -1), axis=(1, 2))
    length_B = jnp.max(positions_BxT, axis=1) + 1
    return jnp.where(length_B > 0, top_B + 1 - length_B, 0).astype(jnp.int32)


def image_inputs(
    model,
    input_ids_BxT: jax.Array,
    positions_BxT: jax.Array,
    images: dict[str, jax.Array] | None,
    cache: KVCache,
) -> tuple[jax.Array, ImageContext | None, jax.Array | None]:
    """(the token embeddings of the CausalLM `model` with the images in place, the new tokens'
    ImageContext or None for plain text decoding, the rows' rope deltas for the cache or None).

    images: the prompts' image fields by batch name, each [B, *per_row] as the family's row
    function lays out a row (models/image_rows.py), the TOKEN fields aligned with the tokens;
    None in decode steps (and for text prompts)."""
    x_BxTxD = model._embed(input_ids_BxT)
    if not images:
        delta_B = cache.rope_delta_B
        if delta_B is None:
            return x_BxTxD, None, None
        return x_BxTxD, ImageContext(positions_BxT + delta_B[:, None]), delta_B
    segment_ids_BxT = (positions_BxT >= 0).astype(jnp.int32)
    x_BxTxD, rope_positions, groups_BxT = place_images(
        model.vision, input_ids_BxT, segment_ids_BxT, positions_BxT, x_BxTxD, images
    )
    delta_B = rope_deltas(rope_positions, positions_BxT) if rope_positions.ndim == 3 else None
    key_groups_BxS = None
    if groups_BxT is not None:
        empty_BxS = jnp.zeros(cache.positions_BxS.shape, jnp.int32)
        key_groups_BxS = write_slots(empty_BxS, groups_BxT, cache.index)
    return x_BxTxD, ImageContext(rope_positions, groups_BxT, key_groups_BxS), delta_B
