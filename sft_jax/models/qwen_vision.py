"""Qwen2.5-VL's vision transformer in Flax NNX, as transformers'
Qwen2_5_VisionTransformerPretrainedModel computes it, and the placement of its outputs at the
image tokens of the text.

Each batch row holds its images' flattened patches (the image processor's pixel_values, in its
order: per image, 2 x 2 blocks of neighbouring patches, row by row) and the index arrays that
models/qwen_vl_rows.py computes on the host from the images' grids, so that every shape is
static under jit:

  vision_patches [B, P, C*Tp*p*p]  the 3-D patch convolution is one matmul over a patch
  vision_patch_positions [B, P, 2] each patch's (row, column) in its image: the 2-D RoPE
  vision_window_ids [B, P]         each patch's window (1, 2, ...; 0: padding)
  vision_window_order [B, P]       the patches window by window (transformers' window index)
  vision_image_ids [B, P]          each patch's image (1, 2, ...; 0: padding): the full blocks
                                   (fullatt_block_indexes) attend within an image, never across

As in transformers, the blocks run on the patches in window order, each window a contiguous
run (windowed blocks attend chunk by chunk: models/vision_attention.py), and the merger on the
patches back in the rows' order. The merger joins each run of 4 patches (one 2 x 2 block) into
one token of the language model's width; the row's k-th image token gets its k-th merged token.

Dimension legend: B batch, P patches, Q merged tokens (P / 4), C vision width, H heads,
E head dim, F MLP width, D language model width, T text time.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sft_jax.models.families import UnsupportedModelError
from sft_jax.models.layers import Linear, RMSNorm, activate, place_in_order
from sft_jax.models.mrope import rotate, sectioned_angles
from sft_jax.models.partitioning import context_shards
from sft_jax.models.qwen_vl_config import VisionSpec
from sft_jax.models.qwen_vl_rows import (
    IMAGE_IDS,
    MROPE,
    PATCHES,
    POSITIONS,
    WINDOW_IDS,
    WINDOW_ORDER,
)
from sft_jax.models.vision_attention import group_attention, window_attention

_NORM_EPS = 1e-6  # transformers builds the vision norms with this eps


class VisionAttention(nnx.Module):
    """Bidirectional attention within a group of patches (a window or an image), 2-D RoPE."""

    def __init__(self, spec: VisionSpec, *, dtype, param_dtype, rngs):
        dense = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs, "use_bias": True}
        width = spec.hidden_size
        self.qkv = Linear(width, 3 * width, axes=("embed", "q_heads"), **dense)
        self.proj = Linear(width, width, axes=("q_heads", "embed"), **dense)
        self.num_heads, self.head_dim = spec.num_heads, spec.head_dim

    def __call__(
        self,
        x_BxPxC: jax.Array,
        angles_BxPxHalf: jax.Array,
        group_BxP: jax.Array,
        window_chunk: int | None,
    ) -> jax.Array:
        """Attention within groups: windows (the patches in window order, none longer than
        window_chunk) or, with window_chunk None, whole images."""
        batch, patches, _ = x_BxPxC.shape
        qkv = self.qkv(x_BxPxC).reshape(batch, patches, 3, self.num_heads, self.head_dim)
        q_BxPxHxE = rotate(qkv[:, :, 0], angles_BxPxHalf)
        k_BxPxHxE = rotate(qkv[:, :, 1], angles_BxPxHalf)
        qkv_group = (q_BxPxHxE, k_BxPxHxE, qkv[:, :, 2], group_BxP)
        scale = self.head_dim**-0.5
        if window_chunk is None:
            out_BxPxHxE = group_attention(*qkv_group, scale)
        else:
            out_BxPxHxE = window_attention(*qkv_group, window_chunk, scale)
        return self.proj(out_BxPxHxE.reshape(batch, patches, -1))


class VisionMLP(nnx.Module):
    """Gated MLP with biases: down(act(gate(x)) * up(x))."""

    def __init__(self, spec: VisionSpec, *, dtype, param_dtype, rngs):
        dense = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs, "use_bias": True}
        width, inner = spec.hidden_size, spec.intermediate_size
        self.gate_proj = Linear(width, inner, axes=("embed", "mlp"), **dense)
        self.up_proj = Linear(width, inner, axes=("embed", "mlp"), **dense)
        self.down_proj = Linear(inner, width, axes=("mlp", "embed"), **dense)
        self.activation = spec.activation

    def __call__(self, x_BxPxC: jax.Array) -> jax.Array:
        hidden_BxPxF = activate(self.activation, self.gate_proj(x_BxPxC)) * self.up_proj(x_BxPxC)
        return self.down_proj(hidden_BxPxF)


class VisionBlock(nnx.Module):
    def __init__(self, spec: VisionSpec, *, dtype, param_dtype, rngs):
        norm = {"eps": _NORM_EPS, "plus_one": False, "param_dtype": param_dtype}
        self.norm1 = RMSNorm(spec.hidden_size, **norm)
        self.attn = VisionAttention(spec, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm2 = RMSNorm(spec.hidden_size, **norm)
        self.mlp = VisionMLP(spec, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(
        self,
        x_BxPxC: jax.Array,
        angles_BxPxHalf: jax.Array,
        group_BxP: jax.Array,
        window_chunk: int | None,
    ) -> jax.Array:
        normed = self.norm1(x_BxPxC)
        x_BxPxC = x_BxPxC + self.attn(normed, angles_BxPxHalf, group_BxP, window_chunk)
        return x_BxPxC + self.mlp(self.norm2(x_BxPxC))


class PatchMerger(nnx.Module):
    """RMSNorm, then each 2 x 2 block of patches (4C values) through Linear, GELU, Linear."""

    def __init__(self, spec: VisionSpec, *, dtype, param_dtype, rngs):
        dense = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs, "use_bias": True}
        merged = spec.hidden_size * spec.merge_unit
        self.ln_q = RMSNorm(
            spec.hidden_size, eps=_NORM_EPS, plus_one=False, param_dtype=param_dtype
        )
        self.fc1 = Linear(merged, merged, axes=("embed", "mlp"), **dense)
        self.fc2 = Linear(merged, spec.out_hidden_size, axes=("mlp", "embed"), **dense)
        self.merge_unit = spec.merge_unit

    def __call__(self, x_BxPxC: jax.Array) -> jax.Array:
        batch, patches, _ = x_BxPxC.shape
        normed = self.ln_q(x_BxPxC).reshape(batch, patches // self.merge_unit, -1)
        return self.fc2(jax.nn.gelu(self.fc1(normed), approximate=False))


class QwenVision(nnx.Module):
    """Patches -> merged image tokens [B, Q, D]; `embed` places them at the image tokens."""

    def __init__(self, spec: VisionSpec, *, dtype, param_dtype, rngs):
        dense = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        self.spec = spec
        self.patch_embed = Linear(
            spec.patch_dim, spec.hidden_size, axes=(None, "embed"), use_bias=False, **dense
        )
        self.blocks = nnx.List([VisionBlock(spec, **dense) for _ in range(spec.depth)])
        self.merger = PatchMerger(spec, **dense)
        self.dtype = dtype

    def __call__(self, images: dict[str, jax.Array]) -> jax.Array:
        """Merged image tokens [B, Q, D] of the rows' patches, in the rows' order. The blocks
        run on the patches in window order (transformers' too), the merger on them back in
        the rows' order (each merged token's 4 patches stay together in both)."""
        order_BxP = images[WINDOW_ORDER]

        def windowed(x_BxPx: jax.Array) -> jax.Array:
            index = order_BxP.reshape(*order_BxP.shape, *(1,) * (x_BxPx.ndim - 2))
            return jnp.take_along_axis(x_BxPx, index, axis=1)

        x_BxPxC = windowed(self.patch_embed(images[PATCHES].astype(self.dtype)))
        angles_BxPxHalf = windowed(
            sectioned_angles(
                images[POSITIONS],
                jnp.asarray(self._inverse_frequencies()),
                (self.spec.head_dim // 4,) * 2,
            )
        )
        windows_BxP, frames_BxP = windowed(images[WINDOW_IDS]), windowed(images[IMAGE_IDS])
        chunk = self.spec.window_units**2 * self.spec.merge_unit  # patches of a full window
        for index, block in enumerate(self.blocks):
            if index in self.spec.fullatt_block_indexes:
                x_BxPxC = block(x_BxPxC, angles_BxPxHalf, frames_BxP, None)
            else:
                x_BxPxC = block(x_BxPxC, angles_BxPxHalf, windows_BxP, chunk)
        inverse_BxP = jnp.argsort(order_BxP, axis=1)
        return self.merger(jnp.take_along_axis(x_BxPxC, inverse_BxP[..., None], axis=1))

    def _inverse_frequencies(self) -> np.ndarray:
        """[E/2] frequencies of the 2-D RoPE: those of 1-D RoPE over E/2 dims (E/4 of them,
        transformers' compute_axial_rope_parameters), once for the row, once for the column."""
        half = self.spec.head_dim // 2
        exponents = np.arange(0, half, 2, dtype=np.int64).astype(np.float32) / half
        return np.tile(1.0 / (self.spec.rope_theta**exponents), 2).astype(np.float32)

    def place(
        self,
        input_ids_BxT: jax.Array,
        segment_ids_BxT: jax.Array,
        positions_BxT: jax.Array,
        x_BxTxD: jax.Array,
        images: dict[str, jax.Array] | None,
    ) -> tuple[jax.Array, jax.Array, None]:
        """(embeddings with the merged patches in place, M-RoPE positions [B, T, 3], no image
        groups: image tokens attend causally); a text-only batch as it is (its M-RoPE
        positions are its 1-D ones on every axis)."""
        del segment_ids_BxT  # M-RoPE positions restart per document in the row's fields
        if not images:
            return x_BxTxD, positions_BxT, None
        if context_shards() > 1:  # its masks would read the [B, T, 3] positions as 1-D ones
            raise UnsupportedModelError(
                "Qwen2.5-VL with images cannot split the sequence over mesh.context yet; set "
                "mesh.context=1."
            )
        return (*self.embed(x_BxTxD, input_ids_BxT, images), None)

    def embed(
        self,
        x_BxTxD: jax.Array,
        input_ids_BxT: jax.Array,
        images: dict[str, jax.Array],
    ) -> tuple[jax.Array, jax.Array]:
        """(token embeddings with each row's k-th image token replaced by its k-th merged
        token, the M-RoPE positions [B, T, 3] the language model turns its heads by)."""
        is_image_BxT = input_ids_BxT == self.spec.image_token_id
        x_BxTxD = place_in_order(x_BxTxD, is_image_BxT, self(images))
        return x_BxTxD, jnp.stack([images[name] for name in MROPE], axis=-1)
