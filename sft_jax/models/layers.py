"""Building blocks of the decoder: linear layers (with adapter and quantized-storage slots),
RMSNorm, float32-output einsums and rotary embeddings.

Dimension legend: B batch, T time, D model width, E head dim, V vocabulary (see decoder.py).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from sft_jax.models.config import ModelConfig, RopeSpec
from sft_jax.models.mrope import sectioned_angles
from sft_jax.models.quantize import dequantize

_INIT_STD = 0.02  # transformers' default initializer_range, for models not loaded from disk


def _broadcast_last(vector: jax.Array, ndim: int) -> jax.Array:
    """A [N] vector shaped [1, ..., 1, N] to scale the last axis of an ndim array."""
    return vector.reshape((1,) * (ndim - 1) + vector.shape)


def normal_init(rngs: nnx.Rngs, shape: tuple[int, ...], dtype: jnp.dtype) -> jax.Array:
    return (_INIT_STD * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


class LoRAParam(nnx.Param):
    """Low-rank adapter weights: with adapters, the parameters training updates (the
    adapter code, sft_jax.adapters.lora, creates them; the model only computes with them)."""


class FrozenParam(nnx.Param):
    """A checkpoint tensor that fine-tuning never updates (DeepSeek-V3's score-correction bias,
    set by load statistics in pre-training, not by gradients): loaded and exported with the
    parameters, outside TRAINABLE."""


# Every parameter but the frozen ones, an image-text model's vision part included.
TRAINABLE_WITH_VISION = nnx.All(nnx.Param, nnx.Not(FrozenParam))
# The variables full fine-tuning trains by default: those, but not an image-text model's vision
# part (`vision`: frozen unless config.model.train_vision; the text model trains).
TRAINABLE = nnx.All(TRAINABLE_WITH_VISION, nnx.Not(nnx.PathContains("vision")))


class Linear(nnx.Module):
    """y = x @ kernel (+ bias) (+ LoRA: scale * dropout(x) @ lora_a @ lora_b), kernel [in, out].

    The frozen kernel may be stored quantized (`quant`, see models/quantize.py); the adapter
    code (sft_jax.adapters.lora, sft_jax.adapters.adalora) fills the low-rank slots after the
    model is built:
    - AdaLoRA (`lora_e`, singular values [rank]): scale * dropout(x) @ lora_a @ diag(e) @ lora_b.
    - DoRA (`lora_magnitude`, [out]): with W' = kernel + scale * lora_a @ lora_b and
      n = ||W'|| per output column (a constant of the gradient, as in the DoRA paper and PEFT),
      y = x @ kernel + (m / n - 1) * x' @ kernel + (m / n) * scale * x' @ lora_a @ lora_b
      (x' = dropout(x)), i.e. x @ (m / n * W') without dropout.
    A scale of 0 turns the adapter off entirely (sft_jax.adapters.lora.adapters_off).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        axes: tuple[str, str],
        use_bias: bool,
        dtype: jnp.dtype,
        param_dtype: jnp.dtype,
        rngs: nnx.Rngs,
    ):
        self.dtype = dtype
        self.axes = axes
        self.in_features, self.out_features = in_features, out_features
        self.kernel = nnx.Param(
            normal_init(rngs, (in_features, out_features), param_dtype), logical_axes=axes
        )
        self.bias = (
            nnx.Param(jnp.zeros((out_features,), param_dtype), logical_axes=(axes[1],))
            if use_bias
            else None
        )
        # Filled in later (models/quantize.py, sft_jax.adapters.lora); declared as data so that NNX
        # tracks what they hold.
        self.quant = nnx.data(None)  # nnx.Dict of QuantizedState replacing `kernel` (QLoRA)
        self.quant_spec = None
        self.lora_a = nnx.data(None)  # LoRAParam [in, rank]
        self.lora_b = nnx.data(None)  # LoRAParam [rank, out], zero-initialized
        self.lora_e = nnx.data(None)  # LoRAParam [rank]: AdaLoRA's singular values
        self.lora_magnitude = nnx.data(None)  # LoRAParam [out]: DoRA's magnitude vector
        self.lora_scale = 0.0
        self.lora_dropout = 0.0

    def weight(self) -> jax.Array:
        """The (dequantized) kernel [in, out] in the compute dtype."""
        if self.quant is None:
            return self.kernel[...].astype(self.dtype)
        stored = {name: variable[...] for name, variable in self.quant.items()}
        return dequantize(stored, self.quant_spec, self.dtype)

    def __call__(self, x: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
        x = x.astype(self.dtype)
        y = jnp.einsum("...i,io->...o", x, self.weight())
        if self.bias is not None:
            y = y + _broadcast_last(self.bias[...].astype(self.dtype), y.ndim)
        if self.lora_a is None or self.lora_scale == 0:
            return y
        adapter_x = x
        if self.lora_dropout > 0 and dropout_key is not None:
            keep = jax.random.bernoulli(dropout_key, 1.0 - self.lora_dropout, x.shape)
            adapter_x = jnp.where(keep, x / (1.0 - self.lora_dropout), 0).astype(self.dtype)
        low_rank = jnp.einsum("...i,ir->...r", adapter_x, self.lora_a[...].astype(self.dtype))
        if self.lora_e is not None:
            low_rank = low_rank * _broadcast_last(self.lora_e[...].astype(self.dtype), y.ndim)
        delta = jnp.einsum("...r,ro->...o", low_rank, self.lora_b[...].astype(self.dtype))
        delta = (self.lora_scale * delta).astype(self.dtype)
        if self.lora_magnitude is None:
            return y + delta
        factor = _broadcast_last(self.dora_factor().astype(self.dtype), y.ndim)
        base = y if adapter_x is x else jnp.einsum("...i,io->...o", adapter_x, self.weight())
        if self.bias is not None and adapter_x is x:
            base = base - _broadcast_last(self.bias[...].astype(self.dtype), y.ndim)
        return y + (factor - 1) * base + factor * delta

    def adapted_kernel(self) -> jax.Array:
        """kernel + scale * lora_a @ (diag(lora_e)) @ lora_b [in, out] in float32."""
        kernel = self.weight().astype(jnp.float32)
        if self.lora_a is None:
            return kernel
        lora_a = self.lora_a[...].astype(jnp.float32)
        if self.lora_e is not None:
            lora_a = lora_a * self.lora_e[...].astype(jnp.float32)[None, :]
        return kernel + self.lora_scale * (lora_a @ self.lora_b[...].astype(jnp.float32))

    def dora_factor(self) -> jax.Array:
        """DoRA's m / ||W'|| per output column [out] (float32), the norm without gradient."""
        norm = jnp.linalg.norm(self.adapted_kernel(), axis=0)
        return self.lora_magnitude[...].astype(jnp.float32) / jax.lax.stop_gradient(norm)


def fold_key(key: jax.Array | None, index: int) -> jax.Array | None:
    """A sub-key per layer / projection, or None where there is no key (no dropout)."""
    return None if key is None else jax.random.fold_in(key, index)


class RMSNorm(nnx.Module):
    """RMS normalization over the last axis, in float32; Gemma scales by (1 + w)."""

    def __init__(self, dim: int, *, eps: float, plus_one: bool, param_dtype: jnp.dtype):
        self.eps = eps
        self.plus_one = plus_one
        init = jnp.zeros if plus_one else jnp.ones
        self.scale = nnx.Param(init((dim,), param_dtype), logical_axes=("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        scale = _broadcast_last(self.scale[...], x.ndim)
        if self.plus_one:
            return (normed * (1.0 + scale.astype(jnp.float32))).astype(x.dtype)
        return normed.astype(x.dtype) * scale.astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def einsum_f32(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """einsum with float32 output (logits, attention scores) whose backward matmuls take the
    operands' dtype: the float32 cotangent is cast to it first. Plain autodiff would instead
    run both backward matmuls in float32 (bfloat16 operands upcast), at a fraction of the
    accelerator's bfloat16 speed; the LM head of a 128k vocabulary is a fifth of a 1B model."""
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _einsum_f32_fwd(spec: str, a: jax.Array, b: jax.Array):
    return einsum_f32(spec, a, b), (a, b)


def _einsum_f32_bwd(spec: str, operands: tuple[jax.Array, jax.Array], g: jax.Array):
    a, b = operands
    _, vjp = jax.vjp(lambda a, b: jnp.einsum(spec, a, b), a, b)
    return vjp(g.astype(jnp.result_type(a, b)))


einsum_f32.defvjp(_einsum_f32_fwd, _einsum_f32_bwd)


def apply_rope(x_BTxE: jax.Array, positions_BxT: jax.Array, rope: RopeSpec) -> jax.Array:
    """Rotates the two halves of the last axis of x_[B, T, heads, E] by position * frequency
    (scaled by the rope's attention factor: YaRN's, 1 otherwise); with a partial rotary factor
    only the leading int(E * factor) dims turn, as two halves of their own (proportional RoPE
    reads its factor in its frequencies instead: Gemma 4's pairs span the whole head)."""
    if rope.partial_rotary_factor != 1.0 and rope.rope_type != "proportional":
        turned = int(x_BTxE.shape[-1] * rope.partial_rotary_factor)
        full = dataclasses.replace(rope, partial_rotary_factor=1.0)
        rotated = apply_rope(x_BTxE[..., :turned], positions_BxT, full)
        return jnp.concatenate([rotated, x_BTxE[..., turned:]], axis=-1)
    head_dim = x_BTxE.shape[-1]
    if rope.rope_type == "dynamic":  # frequencies follow the batch's longest position
        inv_freq = rope.dynamic_inverse_frequencies(head_dim, jnp.max(positions_BxT) + 1)
    else:
        inv_freq = jnp.asarray(rope.inverse_frequencies(head_dim))
    if positions_BxT.ndim == 3:  # M-RoPE (Qwen2.5-VL): [B, T, 3] positions, models/mrope.py
        angles_BxTxHalf = sectioned_angles(positions_BxT, inv_freq, rope.mrope_section)
    else:
        angles_BxTxHalf = positions_BxT.astype(jnp.float32)[:, :, None] * inv_freq[None, None, :]
    cos = jnp.cos(angles_BxTxHalf)[:, :, None, :]
    sin = jnp.sin(angles_BxTxHalf)[:, :, None, :]
    if rope.attention_factor != 1.0:
        cos, sin = cos * rope.attention_factor, sin * rope.attention_factor
    x32 = x_BTxE.astype(jnp.float32)
    first, second = x32[..., : head_dim // 2], x32[..., head_dim // 2 :]
    rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    return rotated.astype(x_BTxE.dtype)


def activate(kind: str, x: jax.Array) -> jax.Array:
    """The MLP activation by its config name ("silu" or "gelu_pytorch_tanh")."""
    return jax.nn.gelu(x, approximate=True) if kind == "gelu_pytorch_tanh" else jax.nn.silu(x)


class MLP(nnx.Module):
    """Gated MLP: down(act(gate(x)) * up(x)); F is intermediate_size unless given."""

    def __init__(self, config: ModelConfig, *, dtype, param_dtype, rngs, width: int = 0):
        c, width = config, width or config.intermediate_size
        dense = {"use_bias": c.mlp_bias, "dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        self.gate_proj = Linear(c.hidden_size, width, axes=("embed", "mlp"), **dense)
        self.up_proj = Linear(c.hidden_size, width, axes=("embed", "mlp"), **dense)
        self.down_proj = Linear(width, c.hidden_size, axes=("mlp", "embed"), **dense)
        self.activation = c.activation

    def __call__(self, x_BxTxD: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
        gate_BxTxF = self.gate_proj(x_BxTxD, fold_key(dropout_key, 0))
        activated = activate(self.activation, gate_BxTxF)
        hidden_BxTxF = activated * self.up_proj(x_BxTxD, fold_key(dropout_key, 1))
        return self.down_proj(hidden_BxTxF, fold_key(dropout_key, 2))


def head_logits(hidden_BxTxD: jax.Array, head_VxD: jax.Array, softcap: float | None) -> jax.Array:
    """float32 logits [..., V] from hidden states and an LM head (or a slice of its rows), the
    head cast to the hidden states' (compute) dtype here: callers that loop over chunks hold it
    in the parameter dtype, so that its gradient adds up in that dtype."""
    logits = einsum_f32("...D,VD->...V", hidden_BxTxD, head_VxD.astype(hidden_BxTxD.dtype))
    if softcap is not None:
        logits = jnp.tanh(logits / softcap) * softcap
    return logits


def place_in_order(x_BxTxD: jax.Array, at_BxT: jax.Array, tokens_BxQxD: jax.Array) -> jax.Array:
    """x with the row's k-th position where at_BxT is set replaced by the row's k-th token of
    tokens_BxQxD (an image-text model's image tokens into the text embeddings); positions past
    the row's Q tokens take its last."""
    index_BxT = jnp.clip(
        jnp.cumsum(at_BxT.astype(jnp.int32), axis=1) - 1, 0, tokens_BxQxD.shape[1] - 1
    )
    placed_BxTxD = jnp.take_along_axis(
        tokens_BxQxD.astype(x_BxTxD.dtype), index_BxT[..., None], axis=1
    )
    return jnp.where(at_BxT[..., None], placed_BxTxD, x_BxTxD)
