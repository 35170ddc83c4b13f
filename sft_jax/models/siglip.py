"""The SigLIP vision tower (transformers' SiglipVisionTransformer without its pooling head), in
Flax NNX: patch embedding, learned position embeddings, pre-norm encoder layers with
bidirectional attention, final LayerNorm.

Dimension legend: N images, C channels, P patches per image (a grid of h x w), D tower width,
H heads, E head dim, F MLP width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sft_jax.models.gemma3_vision_config import VisionSpec
from sft_jax.models.layers import Linear, activate, normal_init


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis with scale and bias, computed in float32."""

    def __init__(self, dim: int, *, eps: float, param_dtype: jnp.dtype):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=(None,))
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype), logical_axes=(None,))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        normed = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        shape = (1,) * (x.ndim - 1) + (-1,)
        scale = self.scale[...].astype(jnp.float32).reshape(shape)
        return (normed * scale + self.bias[...].astype(jnp.float32).reshape(shape)).astype(x.dtype)


def _linear(spec_in: int, spec_out: int, axes: tuple[str, str], dense: dict) -> Linear:
    # Split by the decoder's rules (models/partitioning.py: embed over fsdp, heads and mlp
    # over tensor); biases as in SigLIP.
    return Linear(spec_in, spec_out, axes=axes, use_bias=True, **dense)


class EncoderLayer(nnx.Module):
    """x + attn(norm1(x)), then + mlp(norm2(x)); attention over all patches of the image."""

    def __init__(self, spec: VisionSpec, *, dtype, param_dtype, rngs):
        width, dense = spec.hidden_size, {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        norm = {"eps": spec.layer_norm_eps, "param_dtype": param_dtype}
        self.num_heads = spec.num_heads
        self.norm1 = LayerNorm(width, **norm)
        heads_in, heads_out = ("embed", "q_heads"), ("q_heads", "embed")
        self.q_proj = _linear(width, width, heads_in, dense)
        self.k_proj = _linear(width, width, heads_in, dense)
        self.v_proj = _linear(width, width, heads_in, dense)
        self.out_proj = _linear(width, width, heads_out, dense)
        self.norm2 = LayerNorm(width, **norm)
        self.fc1 = _linear(width, spec.intermediate_size, ("embed", "mlp"), dense)
        self.fc2 = _linear(spec.intermediate_size, width, ("mlp", "embed"), dense)

    def _attention(self, x_NxPxD: jax.Array) -> jax.Array:
        images, patches, width = x_NxPxD.shape
        head_dim = width // self.num_heads

        def heads(linear: Linear) -> jax.Array:
            return linear(x_NxPxD).reshape(images, patches, self.num_heads, head_dim)

        q, k, v = heads(self.q_proj), heads(self.k_proj), heads(self.v_proj)
        scores_NxHxPxP = jnp.einsum("NPHE,NQHE->NHPQ", q, k, preferred_element_type=jnp.float32) * (
            head_dim**-0.5
        )
        probs = jax.nn.softmax(scores_NxHxPxP, axis=-1).astype(v.dtype)
        out_NxPxHxE = jnp.einsum("NHPQ,NQHE->NPHE", probs, v)
        return self.out_proj(out_NxPxHxE.reshape(images, patches, width))

    def __call__(self, x_NxPxD: jax.Array) -> jax.Array:
        x_NxPxD = x_NxPxD + self._attention(self.norm1(x_NxPxD))
        hidden_NxPxF = activate("gelu_pytorch_tanh", self.fc1(self.norm2(x_NxPxD)))
        return x_NxPxD + self.fc2(hidden_NxPxF)


class SiglipTower(nnx.Module):
    """pixel values [N, C, S, S] -> the last hidden states [N, P, D] (post-LayerNorm)."""

    def __init__(self, spec: VisionSpec, *, dtype, param_dtype, rngs):
        self.spec, self.dtype = spec, dtype
        width, patch = spec.hidden_size, spec.patch_size
        # The convolution's kernel as checkpoints store it: [D, C, patch, patch].
        self.patch_embed = nnx.Param(
            normal_init(rngs, (width, spec.num_channels, patch, patch), param_dtype),
            logical_axes=("embed", None, None, None),
        )
        self.patch_bias = nnx.Param(jnp.zeros((width,), param_dtype), logical_axes=(None,))
        self.position_embed = nnx.Param(
            normal_init(rngs, (spec.patches_per_side**2, width), param_dtype),
            logical_axes=(None, "embed"),
        )
        dense = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        self.layers = nnx.List([EncoderLayer(spec, **dense) for _ in range(spec.num_layers)])
        self.post_norm = LayerNorm(width, eps=spec.layer_norm_eps, param_dtype=param_dtype)

    def __call__(self, pixels_NxCxSxS: jax.Array) -> jax.Array:
        images, channels = pixels_NxCxSxS.shape[:2]
        side, patch = self.spec.patches_per_side, self.spec.patch_size
        # The stride-`patch` convolution as one matmul over each patch's C x patch x patch values,
        # patches in row-major order of the grid (as the convolution's output is flattened).
        grid = pixels_NxCxSxS.astype(self.dtype).reshape(images, channels, side, patch, side, patch)
        kernel = self.patch_embed[...].astype(self.dtype)
        x_NxHxWxD = jnp.einsum("NChpwq,DCpq->NhwD", grid, kernel)
        x_NxPxD = x_NxHxWxD.reshape(images, side * side, -1)
        x_NxPxD = x_NxPxD + self.patch_bias[...].astype(self.dtype)[None, None]
        x_NxPxD = x_NxPxD + self.position_embed[...].astype(self.dtype)[None]
        for layer in self.layers:
            x_NxPxD = layer(x_NxPxD)
        return self.post_norm(x_NxPxD)
