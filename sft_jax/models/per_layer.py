"""Gemma 4's per-layer pieces: per-layer input embeddings (PLE), the stored layer scalar and
the RMSNorm without scale of its values.

PLE, as transformers' Gemma4TextModel computes it (L layers, P = hidden_size_per_layer_input):
  tokens_BxTxLxP  = table[ids] * sqrt(P)                      (embed_tokens_per_layer)
  context_BxTxLxP = norm(((x_BxTxD @ projection) * D ** -0.5)) (per_layer_model_projection;
                    x the scaled token embeddings; norm over P)
  ple_BxTxLxP     = (context + tokens) * 2 ** -0.5
and layer l, after its MLP's residual add:
  h = h + norm(((act(h @ gate) * ple[:, :, l]) @ projection))   (per_layer_input_gate [D, P],
                                                                per_layer_projection [P, D])
then h * layer_scalar. Dimension legend as in decoder.py, L layers, P the PLE width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sft_jax.models.config import ModelConfig
from sft_jax.models.layers import Linear, RMSNorm, activate, fold_key, normal_init


class Buffer(nnx.Variable):
    """A stored tensor of the checkpoint that is not trained (transformers' persistent
    buffers, as Gemma 4's layer_scalar): loaded and exported, never an nnx.Param."""


def rms_normalize(x: jax.Array, eps: float) -> jax.Array:
    """RMSNorm without scale over the last axis, in float32 (Gemma 4's v_norm)."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return normed.astype(x.dtype)


def _scaled_by_root(x: jax.Array, width: int, weight_dtype: jnp.dtype) -> jax.Array:
    # transformers rounds sqrt(width) to the weight dtype before multiplying.
    return x * jnp.asarray(np.sqrt(width), weight_dtype)


class PerLayerEmbeddings(nnx.Module):
    """The per-layer inputs [B, T, L, P] of every layer from the token ids and embeddings."""

    def __init__(self, config: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        c, width = config, config.per_layer_input_size
        self.num_layers, self.width, self.dtype = c.num_layers, width, dtype
        self.table = nnx.Param(
            normal_init(rngs, (c.per_layer_vocab_size, c.num_layers * width), param_dtype),
            logical_axes=("vocab", "embed"),
        )
        self.projection = Linear(
            c.hidden_size,
            c.num_layers * width,
            axes=("embed", "mlp"),
            use_bias=False,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.norm = RMSNorm(width, eps=c.rms_norm_eps, plus_one=False, param_dtype=param_dtype)

    def __call__(self, input_ids_BxT: jax.Array, embeds_BxTxD: jax.Array) -> jax.Array:
        batch, seq_len = input_ids_BxT.shape
        shape = (batch, seq_len, self.num_layers, self.width)
        table = self.table[...]
        tokens = _scaled_by_root(jnp.take(table, input_ids_BxT, axis=0), self.width, table.dtype)
        tokens_BxTxLxP = tokens.astype(self.dtype).reshape(shape)
        context = self.projection(embeds_BxTxD) * jnp.asarray(
            embeds_BxTxD.shape[-1] ** -0.5, self.dtype
        )
        context_BxTxLxP = self.norm(context.reshape(shape))
        return (context_BxTxLxP + tokens_BxTxLxP) * jnp.asarray(2.0**-0.5, self.dtype)


class PerLayerInput(nnx.Module):
    """One layer's PLE block: h + norm(projection(act(gate(h)) * ple_l))."""

    def __init__(self, config: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        c, width = config, config.per_layer_input_size
        dense = {"use_bias": False, "dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        self.gate = Linear(c.hidden_size, width, axes=("embed", "mlp"), **dense)
        self.projection = Linear(width, c.hidden_size, axes=("mlp", "embed"), **dense)
        self.norm = RMSNorm(
            c.hidden_size, eps=c.rms_norm_eps, plus_one=False, param_dtype=param_dtype
        )
        self.activation = c.activation

    def __call__(
        self, x_BxTxD: jax.Array, ple_BxTxP: jax.Array, dropout_key: jax.Array | None = None
    ) -> jax.Array:
        gated_BxTxP = activate(self.activation, self.gate(x_BxTxD, fold_key(dropout_key, 0)))
        mixed_BxTxP = gated_BxTxP * ple_BxTxP.astype(gated_BxTxP.dtype)
        return x_BxTxD + self.norm(self.projection(mixed_BxTxP, fold_key(dropout_key, 1)))


def layer_scalar(param_dtype: jnp.dtype) -> Buffer:
    """Gemma 4's per-layer output scale [1] (ones until loaded)."""
    return Buffer(jnp.ones((1,), param_dtype), logical_axes=("norm",))
