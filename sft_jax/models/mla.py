"""Multi-head latent attention (DeepSeek-V3's MLA), as transformers' DeepseekV3Attention.

Dimension legend: B batch, T query time, S key time, D model width, H heads, R a latent's
width, P the rotated (rope) dims of a q/k head, N its dims without position (nope), E = N + P
a q/k head, W a value head.

Queries come from x through a low-rank latent (q_a_proj, an RMSNorm, q_b_proj) or one q_proj;
keys and values from one latent shared by every head (kv_a_proj_with_mqa gives R + P: the
latent, normed then expanded by kv_b_proj to each head's key part N and value W, and one
rotated key part P that every head shares). Each head's q.k is over E = N + P.

The KV cache holds per-head keys [B, S, H, E] and values [B, S, H, W] after kv_b_proj (the
simple layout; caching the R + P latent instead would be smaller). Only the einsum attention
runs it: fused kernels, context parallelism and prefix tuning are refused by name.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sft_jax.models.attention import Attention
from sft_jax.models.config import ModelConfig, UnsupportedModelError
from sft_jax.models.kv_cache import KVPrefix, LayerCache
from sft_jax.models.layers import Linear, RMSNorm, apply_rope, fold_key
from sft_jax.models.partitioning import context_shards

# The linear layers of an MLA layer, by their checkpoint names (q_proj only without a q
# latent; q_a_proj and q_b_proj only with one).
MLA_PROJECTIONS = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
MLA_ONLY_PROJECTIONS = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj")
_LATENT_NORM_EPS = 1e-6  # transformers builds q_a_layernorm and kv_a_layernorm with the default


class MLAttention(Attention):
    """Latent attention in place of grouped-query attention: every head its own key and value
    (K = H, G = 1), so Attention's masking, weighting and cache code runs it unchanged."""

    def __init__(self, config: ModelConfig, layer_index: int, *, dtype, param_dtype, rngs):
        c, mla = config, config.mla
        heads = c.num_heads
        self.num_heads = self.num_kv_heads = heads
        self.nope_dim, self.rope_dim = mla.qk_nope_head_dim, mla.qk_rope_head_dim
        self.value_dim, self.latent_dim = mla.v_head_dim, mla.kv_lora_rank
        self.head_dim = mla.v_head_dim  # the width of each head's output (Attention._attend)
        self.scale, self.softcap, self.window = c.attention_scale, None, None
        self.kind, self.max_segments = c.attention, c.max_segments
        self.rope, self.interleaved = c.rope_of_layer(layer_index), mla.rope_interleave
        self.sinks, self.own_kv = None, True  # Attention's: no sinks, no KV sharing
        dense = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        norm = {"eps": _LATENT_NORM_EPS, "plus_one": False, "param_dtype": param_dtype}
        qk_width, rank = heads * (self.nope_dim + self.rope_dim), mla.q_lora_rank
        if rank:
            self.q_proj = None
            self.q_a_proj = Linear(
                c.hidden_size, rank, axes=("embed", "latent"), use_bias=c.o_bias, **dense
            )
            self.q_a_layernorm = RMSNorm(rank, **norm)
            self.q_b_proj = Linear(
                rank, qk_width, axes=("latent", "q_heads"), use_bias=False, **dense
            )
        else:
            self.q_a_proj = self.q_a_layernorm = self.q_b_proj = None
            self.q_proj = Linear(
                c.hidden_size, qk_width, axes=("embed", "q_heads"), use_bias=False, **dense
            )
        self.kv_a_proj_with_mqa = Linear(
            c.hidden_size,
            self.latent_dim + self.rope_dim,
            axes=("embed", None),
            use_bias=c.o_bias,
            **dense,
        )
        self.kv_a_layernorm = RMSNorm(self.latent_dim, **norm)
        self.kv_b_proj = Linear(
            self.latent_dim,
            heads * (self.nope_dim + self.value_dim),
            axes=("latent", "q_heads"),
            use_bias=False,
            **dense,
        )
        self.o_proj = Linear(
            heads * self.value_dim,
            c.hidden_size,
            axes=("q_heads", "embed"),
            use_bias=c.o_bias,
            **dense,
        )
        names = ("q_a_proj", "q_b_proj") if rank else ("q_proj",)
        self.projection_names = (*names, "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")

    def __call__(
        self,
        x_BxTxD: jax.Array,
        positions_BxT: jax.Array,
        segment_ids_BxT: jax.Array,
        dropout_key: jax.Array | None = None,
        prefix: KVPrefix | None = None,
        shared_kv: tuple[jax.Array, jax.Array] | None = None,
    ):
        self._refuse(prefix)
        if shared_kv is not None:
            raise UnsupportedModelError("latent attention (MLA) shares no keys and values")
        return super().__call__(x_BxTxD, positions_BxT, segment_ids_BxT, dropout_key)

    def extend(
        self,
        x_BxTxD: jax.Array,
        positions_BxT: jax.Array,
        cache: LayerCache,
        prefix: KVPrefix | None = None,
    ) -> tuple[jax.Array, LayerCache]:
        self._refuse(prefix)
        return super().extend(x_BxTxD, positions_BxT, cache)

    def _refuse(self, prefix: KVPrefix | None) -> None:
        """What the einsum path alone runs: say so by name rather than compute it wrongly."""
        if prefix is not None:
            raise UnsupportedModelError("prefix tuning is not implemented for latent attention.")
        if self.kind != "xla":
            raise UnsupportedModelError(
                f"attention={self.kind!r} is not implemented for latent attention (DeepSeek-V3);"
                " set config.model.attention='xla'."
            )
        if context_shards() > 1:
            raise UnsupportedModelError(
                "latent attention (DeepSeek-V3) cannot run with the sequence split over "
                "mesh.context; set mesh.context=1."
            )

    def _rotate(self, x_BxTxHxP: jax.Array, positions_BxT: jax.Array) -> jax.Array:
        """RoPE on the rope dims; interleaved pairs (x0, x1), (x2, x3)... are first laid out as
        two halves (evens, odds), which is what transformers' interleaved rotation returns."""
        if self.interleaved:
            x_BxTxHxP = jnp.concatenate([x_BxTxHxP[..., 0::2], x_BxTxHxP[..., 1::2]], axis=-1)
        return apply_rope(x_BxTxHxP, positions_BxT, self.rope)

    def _queries(self, x_BxTxD: jax.Array, dropout_key: jax.Array | None) -> jax.Array:
        if self.q_proj is not None:
            return self.q_proj(x_BxTxD, fold_key(dropout_key, 0))
        latent_BxTxR = self.q_a_layernorm(self.q_a_proj(x_BxTxD, fold_key(dropout_key, 0)))
        return self.q_b_proj(latent_BxTxR, fold_key(dropout_key, 4))

    def queries(
        self, x_BxTxD: jax.Array, positions_BxT: jax.Array, dropout_key: jax.Array | None
    ) -> tuple[jax.Array, None]:
        """Queries [B, T, H, 1, E]: the nope dims and the rotated rope dims; no output gate."""
        batch, seq_len, _ = x_BxTxD.shape
        nope = self.nope_dim
        q_BxTxHxE = self._queries(x_BxTxD, dropout_key).reshape(batch, seq_len, self.num_heads, -1)
        q_rope_BxTxHxP = self._rotate(q_BxTxHxE[..., nope:], positions_BxT)
        q_BxTxHxE = jnp.concatenate([q_BxTxHxE[..., :nope], q_rope_BxTxHxP], axis=-1)
        return q_BxTxHxE[:, :, :, None, :], None

    def keys_values(
        self, x_BxTxD: jax.Array, positions_BxT: jax.Array, dropout_key: jax.Array | None
    ) -> tuple[jax.Array, jax.Array]:
        """Keys [B, T, H, E] (each head's nope dims, the shared rotated rope dims) and values
        [B, T, H, W], from the normed kv latent."""
        batch, seq_len, _ = x_BxTxD.shape
        heads, nope = self.num_heads, self.nope_dim
        compressed_BxTxRP = self.kv_a_proj_with_mqa(x_BxTxD, fold_key(dropout_key, 1))
        latent_BxTxR = self.kv_a_layernorm(compressed_BxTxRP[..., : self.latent_dim])
        k_rope_BxTx1xP = compressed_BxTxRP[..., None, self.latent_dim :]
        kv_BxTxHxNW = self.kv_b_proj(latent_BxTxR, fold_key(dropout_key, 2)).reshape(
            batch, seq_len, heads, nope + self.value_dim
        )
        k_rope_BxTx1xP = self._rotate(k_rope_BxTx1xP, positions_BxT)
        k_rope_BxTxHxP = jnp.broadcast_to(k_rope_BxTx1xP, (batch, seq_len, heads, self.rope_dim))
        k_BxTxHxE = jnp.concatenate([kv_BxTxHxNW[..., :nope], k_rope_BxTxHxP], axis=-1)
        return k_BxTxHxE, kv_BxTxHxNW[..., nope:]
