"""Gemma 3's image path (transformers' Gemma3Model, image parts): the SigLIP tower's patches
averaged to mm_tokens_per_image soft tokens per image, the projector (an RMSNorm scaling by
1 + w, then a projection to the text width), and the soft tokens placed at the image-token
positions of each row: the row's k-th image-token run takes the row's k-th image.

Image tokens attend bidirectionally within their own image (and causally to everything before
it), text causally: `image_groups` numbers each row's image-token runs, which the attention
mask reads (models/attention.py attention_mask).

Dimension legend: B rows, N image slots per row, C channels, S image side in pixels, P patches
per image, M soft tokens per image, T time, D text width, W tower width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sft_jax.models.gemma3_images import PIXEL_VALUES
from sft_jax.models.gemma3_vision_config import VisionSpec
from sft_jax.models.layers import Linear, RMSNorm, place_in_order
from sft_jax.models.siglip import SiglipTower


def image_groups(input_ids_BxT: jax.Array, segment_ids_BxT: jax.Array, image_token: int):
    """[B, T] int32: 1, 2, ... for the tokens of each run of image tokens of a row (a run also
    ends where a packed document does), 0 for text."""
    is_image_BxT = input_ids_BxT == image_token
    previous_image = jnp.pad(is_image_BxT, ((0, 0), (1, 0)))[:, :-1]
    previous_segment = jnp.pad(segment_ids_BxT, ((0, 0), (1, 0)), constant_values=-1)[:, :-1]
    starts_BxT = is_image_BxT & (~previous_image | (previous_segment != segment_ids_BxT))
    runs_BxT = jnp.cumsum(starts_BxT.astype(jnp.int32), axis=1)
    return jnp.where(is_image_BxT, runs_BxT, 0)


class Gemma3Vision(nnx.Module):
    """The tower and projector; `place` puts the images' soft tokens into the embeddings."""

    def __init__(self, spec: VisionSpec, text_width: int, *, dtype, param_dtype, rngs):
        self.spec, self.dtype = spec, dtype
        self.tower = SiglipTower(spec, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.soft_norm = RMSNorm(
            spec.hidden_size, eps=spec.layer_norm_eps, plus_one=True, param_dtype=param_dtype
        )
        # A Linear (kernel [W, D], as checkpoints hold mm_input_projection_weight) so that
        # LoRA can adapt it like any projection (adapters/vision_lora.py).
        self.projection = Linear(
            spec.hidden_size,
            text_width,
            axes=("mlp", "embed"),
            use_bias=False,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )

    def soft_tokens(self, pixels_NxCxSxS: jax.Array) -> jax.Array:
        """[N, M, D] soft tokens of N images, in the compute dtype."""
        hidden_NxPxW = self.tower(pixels_NxCxSxS)
        images, _, width = hidden_NxPxW.shape
        side, pool = self.spec.patches_per_side, self.spec.pool
        grid = hidden_NxPxW.reshape(images, side // pool, pool, side // pool, pool, width)
        pooled_NxMxW = grid.mean(axis=(2, 4)).reshape(images, -1, width)
        normed_NxMxW = self.soft_norm(pooled_NxMxW)
        return self.projection(normed_NxMxW)

    def place(
        self,
        input_ids_BxT: jax.Array,
        segment_ids_BxT: jax.Array,
        positions_BxT: jax.Array,
        x_BxTxD: jax.Array,
        images: dict[str, jax.Array] | None,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(embeddings with each image token's soft token in place, the positions unchanged,
        image groups [B, T]).

        A row's i-th image token takes soft token i % M of its image slot i // M: each image
        is one run of M image tokens (row_images checks the rows it lays out)."""
        groups_BxT = image_groups(input_ids_BxT, segment_ids_BxT, self.spec.image_token_id)
        if not images:  # a text-only batch
            return x_BxTxD, positions_BxT, groups_BxT
        pixels_BxNxCxSxS = images[PIXEL_VALUES]
        rows = pixels_BxNxCxSxS.shape[0]
        soft_NxMxD = self.soft_tokens(pixels_BxNxCxSxS.reshape(-1, *pixels_BxNxCxSxS.shape[2:]))
        soft_BxNMxD = soft_NxMxD.reshape(rows, -1, soft_NxMxD.shape[-1])
        return place_in_order(x_BxTxD, groups_BxT > 0, soft_BxNMxD), positions_BxT, groups_BxT
