"""Gated DeltaNet, the linear-attention layer of Qwen3.5's hybrid decoder (transformers'
Qwen3_5GatedDeltaNet), over packed rows, and its decoding state.

Dimension legend: B batch, T time, D model width, X convolution channels, P earlier inputs
the convolution keeps, J key heads, H value heads, K key head dim, V value head dim.

x -> in_proj_qkv -> causal depthwise conv (width W) + silu -> q [J, K], k [J, K], v [H, V];
beta = sigmoid(in_proj_b x), g = -exp(A_log) * softplus(in_proj_a x + dt_bias); q and k are
L2-normalized, repeated to H heads, q scaled by K^-0.5; the gated delta rule (deltanet.py)
gives o [H, V]; out_proj(RMSNorm(o) * weight * silu(in_proj_z x)). The state and the
convolution's window restart at every document (segment ids in training, position 0 when
decoding).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from sft_jax.models import deltanet
from sft_jax.models.config import LinearAttentionSpec, ModelConfig, UnsupportedModelError
from sft_jax.models.layers import Linear, RMSNorm, fold_key
from sft_jax.models.partitioning import context_shards

# The linear layers of a Gated DeltaNet, by their Hugging Face names.
LINEAR_PROJECTIONS = ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj")
# Its other parameters: attribute -> Hugging Face name under linear_attn.
LINEAR_LEAVES = {"a_log": "A_log", "dt_bias": "dt_bias", "conv_weight": "conv1d.weight"}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LinearState:
    """A Gated DeltaNet layer's decoding state: the last P convolution inputs and the
    delta-rule state (float32)."""

    conv_BxPxX: jax.Array
    recurrent_BxHxKxV: jax.Array

    @classmethod
    def empty(cls, s: LinearAttentionSpec, batch: int, dtype: jnp.dtype) -> LinearState:
        conv = jnp.zeros((batch, s.conv_kernel - 1, s.conv_channels), dtype)
        shape = (batch, s.num_value_heads, s.key_head_dim, s.value_head_dim)
        return cls(conv, jnp.zeros(shape, jnp.float32))


def _a_log_init(rngs: nnx.Rngs, heads: int, dtype: jnp.dtype) -> jax.Array:
    # transformers: A ~ U(0.01, 16), stored as log A.
    return jnp.log(jax.random.uniform(rngs.params(), (heads,), jnp.float32, 0.01, 16.0)).astype(
        dtype
    )


class GatedDeltaNet(nnx.Module):
    """Takes an attention layer's place in the layers layer_types calls "linear_attention"."""

    def __init__(self, config: ModelConfig, layer_index: int, *, dtype, param_dtype, rngs):
        s, width = config.linear_attention, config.hidden_size
        self.spec, self.dtype = s, dtype
        dense = {"use_bias": False, "dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        value_width = s.num_value_heads * s.value_head_dim
        self.in_proj_qkv = Linear(width, s.conv_channels, axes=("embed", "q_heads"), **dense)
        self.in_proj_z = Linear(width, value_width, axes=("embed", "q_heads"), **dense)
        self.in_proj_b = Linear(width, s.num_value_heads, axes=("embed", None), **dense)
        self.in_proj_a = Linear(width, s.num_value_heads, axes=("embed", None), **dense)
        self.out_proj = Linear(value_width, width, axes=("q_heads", "embed"), **dense)
        # PyTorch's depthwise Conv1d weight [X, 1, W], as checkpoints hold it.
        conv_init = 0.02 * jax.random.normal(rngs.params(), (s.conv_channels, 1, s.conv_kernel))
        self.conv_weight = nnx.Param(conv_init.astype(param_dtype), logical_axes=(None,) * 3)
        self.dt_bias = nnx.Param(jnp.ones((s.num_value_heads,), param_dtype), logical_axes=(None,))
        self.a_log = nnx.Param(
            _a_log_init(rngs, s.num_value_heads, param_dtype), logical_axes=(None,)
        )
        norm = {"eps": config.rms_norm_eps, "plus_one": False, "param_dtype": param_dtype}
        self.norm = RMSNorm(s.value_head_dim, **norm)
        self.kind, self.max_segments = config.attention, config.max_segments  # unused here

    def __call__(
        self,
        x_BxTxD: jax.Array,
        positions_BxT: jax.Array,
        segment_ids_BxT: jax.Array,
        dropout_key: jax.Array | None = None,
        prefix: object | None = None,
        shared_kv: object | None = None,
    ) -> jax.Array:
        """The layer over packed rows [B, T, D]; documents are runs of equal segment ids."""
        self._refuse(prefix)
        if shared_kv is not None:
            raise UnsupportedModelError("a Gated DeltaNet layer shares no keys and values")
        if context_shards() > 1:
            raise UnsupportedModelError(
                "Gated DeltaNet layers (Qwen3.5) cannot run with the sequence split over "
                "mesh.context (the delta rule scans the whole row); set mesh.context=1."
            )
        taps = deltanet.segment_taps(segment_ids_BxT, self.spec.conv_kernel)
        starts = deltanet.document_starts(segment_ids_BxT)
        empty = LinearState.empty(self.spec, x_BxTxD.shape[0], x_BxTxD.dtype)
        out_BxTxD, _ = self._mix(x_BxTxD, starts, taps, empty, dropout_key)
        return out_BxTxD

    def extend(
        self,
        x_BxTxD: jax.Array,
        positions_BxT: jax.Array,
        state: LinearState,
        prefix: object | None = None,
    ) -> tuple[jax.Array, LinearState]:
        """T new tokens after the state (positions < 0: padding; 0: a document's start)."""
        self._refuse(prefix)
        real_BxTx1 = (positions_BxT >= 0)[:, :, None]
        x_BxTxD = jnp.where(real_BxTx1, x_BxTxD, 0).astype(x_BxTxD.dtype)  # as transformers
        taps = deltanet.position_taps(positions_BxT, self.spec.conv_kernel)
        return self._mix(x_BxTxD, positions_BxT == 0, taps, state, None)

    @staticmethod
    def _refuse(prefix: object | None) -> None:
        if prefix is not None:
            raise UnsupportedModelError(
                "prefix tuning has no keys and values to prepend in a Gated DeltaNet layer "
                "(Qwen3.5's linear_attention layers); use LoRA or prompt tuning."
            )

    def _mix(
        self,
        x_BxTxD: jax.Array,
        starts_BxT: jax.Array,
        taps_BxTxW: jax.Array,
        state: LinearState,
        dropout_key: jax.Array | None,
    ) -> tuple[jax.Array, LinearState]:
        """Projections, convolution, delta rule, gated norm, out_proj; the state after."""
        s = self.spec
        batch, seq_len, _ = x_BxTxD.shape
        qkv_BxTxX = self.in_proj_qkv(x_BxTxD, fold_key(dropout_key, 0))
        weight_XxW = self.conv_weight[...][:, 0, :]
        qkv_BxTxX, conv_BxPxX = deltanet.causal_conv(
            qkv_BxTxX, weight_XxW, state.conv_BxPxX, taps_BxTxW
        )
        key_width = s.num_key_heads * s.key_head_dim
        q, k, v = jnp.split(qkv_BxTxX, [key_width, 2 * key_width], axis=-1)
        repeats = s.num_value_heads // s.num_key_heads

        def heads(x: jax.Array) -> jax.Array:  # [B, T, J*K] -> normalized [B, T, H, K], f32
            x = x.reshape(batch, seq_len, s.num_key_heads, s.key_head_dim).astype(jnp.float32)
            return jnp.repeat(deltanet.l2_normalize(x), repeats, axis=2)

        q_BxTxHxK, k_BxTxHxK = heads(q) * s.key_head_dim**-0.5, heads(k)
        v_BxTxHxV = v.reshape(batch, seq_len, s.num_value_heads, s.value_head_dim)
        beta_BxTxH = jax.nn.sigmoid(self.in_proj_b(x_BxTxD, fold_key(dropout_key, 1)))
        a_BxTxH = self.in_proj_a(x_BxTxD, fold_key(dropout_key, 2)).astype(jnp.float32)
        decay_h = -jnp.exp(self.a_log[...].astype(jnp.float32))
        g_BxTxH = decay_h[None, None] * jax.nn.softplus(
            a_BxTxH + self.dt_bias[...].astype(jnp.float32)[None, None]
        )
        rule = deltanet.recurrent_delta_rule if seq_len == 1 else deltanet.chunked_delta_rule
        out_BxTxHxV, recurrent = rule(
            q_BxTxHxK,
            k_BxTxHxK,
            v_BxTxHxV,
            g_BxTxH,
            beta_BxTxH,
            starts_BxT,
            state.recurrent_BxHxKxV,
        )
        z_BxTxHxV = self.in_proj_z(x_BxTxD, fold_key(dropout_key, 3))
        z_BxTxHxV = z_BxTxHxV.reshape(batch, seq_len, s.num_value_heads, s.value_head_dim)
        normed = self.norm(out_BxTxHxV.astype(x_BxTxD.dtype))
        gated = (normed * jax.nn.silu(z_BxTxHxV.astype(jnp.float32))).astype(x_BxTxD.dtype)
        out_BxTxD = self.out_proj(gated.reshape(batch, seq_len, -1), fold_key(dropout_key, 4))
        return out_BxTxD, LinearState(conv_BxPxX, recurrent)
