"""Grouped-query attention with RoPE over packed rows, and its KV cache for generation.

Dimension legend: B batch, T query time, S key time, D model width, H query heads, K key/value
heads, G query heads per key/value head (H = K * G), E head dim.

Inputs are packed rows: `positions_BxT` restart at 0 for every document and `segment_ids_BxT`
number the documents of a row (0 = padding). A token attends only to earlier tokens of its own
segment (and, in sliding-window layers, to the last `window` of them, itself included). The
explicit einsums here are the reference; models/kernels.py holds the fused kernels and
models/blockwise.py a flash-style attention in plain JAX.

Generation runs tokens through `Attention.extend` against a `KVCache` instead: each token
attends to the cached slots that hold earlier positions of its own row (positions < 0 mark
padding).

A `KVPrefix` (prefix tuning, set by an adapter) is N key/value slots at positions 0..N-1 that
every token attends to before its own document (or cache), as Hugging Face models attend to a
`past_key_values` prefix: the slots are neither normed nor rotated.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from sft_jax.models.config import ModelConfig, UnsupportedModelError
from sft_jax.models.kernels import blockwise
from sft_jax.models.kernels import fused as kernels
from sft_jax.models.kv_cache import (
    KVPrefix,
    LayerCache,
    cache_mask,
    with_prefix,
    write_slots,
)
from sft_jax.models.layers import Linear, RMSNorm, apply_rope, einsum_f32, fold_key, normal_init
from sft_jax.models.partitioning import balanced_order, context_attention, context_shards
from sft_jax.models.per_layer import rms_normalize


def attention_mask(
    segment_ids_BxT: jax.Array,
    positions_BxT: jax.Array,
    window: int | None,
    image_groups_BxT: jax.Array | None = None,
) -> jax.Array:
    """[B, T, S] True where query t may attend key s: same segment, causal (or, with image
    groups, the same image: models/gemma3_vision.py), inside the window."""
    seq_len = segment_ids_BxT.shape[1]
    same_segment = segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :]
    causal_TxS = jnp.arange(seq_len)[:, None] >= jnp.arange(seq_len)[None, :]
    mask_BxTxS = same_segment & causal_TxS[None]
    if image_groups_BxT is not None:
        same_image = image_groups_BxT[:, :, None] == image_groups_BxT[:, None, :]
        mask_BxTxS = mask_BxTxS | (same_segment & same_image & (image_groups_BxT > 0)[:, :, None])
    if window is not None:
        distance_BxTxS = positions_BxT[:, :, None] - positions_BxT[:, None, :]
        mask_BxTxS = mask_BxTxS & (distance_BxTxS < window)
    return mask_BxTxS


def position_mask(
    q_segment_ids_BxT: jax.Array,
    q_positions_BxT: jax.Array,
    kv_segment_ids_BxS: jax.Array,
    kv_positions_BxS: jax.Array,
    window: int | None,
) -> jax.Array:
    """[B, T, S] True where query t may attend key s, for tokens in any order: same segment
    and an earlier (or the same) position, inside the window. Equal to attention_mask on rows
    in sequence order, as a document is a contiguous run of increasing positions."""
    same_segment = q_segment_ids_BxT[:, :, None] == kv_segment_ids_BxS[:, None, :]
    distance_BxTxS = q_positions_BxT[:, :, None] - kv_positions_BxS[:, None, :]
    mask_BxTxS = same_segment & (distance_BxTxS >= 0)
    if window is not None:
        mask_BxTxS = mask_BxTxS & (distance_BxTxS < window)
    return mask_BxTxS


class Attention(nnx.Module):
    """Grouped-query attention with RoPE (or none: NoPE layers), optional q/k norms (per head
    or over the whole projection), soft-capping and a window."""

    # Its linear layers by checkpoint name (decoder_linears: LoRA, quantization, export).
    projection_names = ("q_proj", "k_proj", "v_proj", "o_proj")

    def __init__(self, config: ModelConfig, layer_index: int, *, dtype, param_dtype, rngs):
        c = config
        self.num_heads, self.num_kv_heads = c.num_heads, c.kv_heads_of(layer_index)
        self.head_dim = c.head_dim_of(layer_index)
        self.scale = c.attention_scale_of(layer_index)
        self.softcap = c.attn_logit_softcap
        if c.attention not in kernels.ATTENTION_KINDS:
            raise ValueError(
                f"attention={c.attention!r}: expected one of {kernels.ATTENTION_KINDS}."
            )
        if c.attention == "cudnn" and self.softcap is not None:
            raise UnsupportedModelError(
                f"attention={c.attention!r} cannot soft-cap attention logits ({c.model_type});"
                " use attention='xla'."
            )
        self.kind, self.max_segments = c.attention, c.max_segments
        self.window = c.window_for(layer_index)
        self.rope = c.rope_of_layer(layer_index)  # None: no RoPE on this layer (NoPE)
        dense = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        q_width, kv_width = c.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        # A layer that shares an earlier layer's keys/values (KV sharing) has no k/v
        # projections; one whose values are its keys' projection (k_eq_v) no v_proj.
        own_kv = c.kv_source_of(layer_index) == layer_index
        own_values = own_kv and layer_index not in c.value_is_key_layers
        self.own_kv = own_kv
        # Qwen3.5: each head's queries followed by as many gate values (attn_output_gate).
        self.gated = c.attn_output_gate
        self.q_proj = Linear(
            c.hidden_size,
            q_width * (2 if self.gated else 1),
            axes=("embed", "q_heads"),
            use_bias=c.qkv_bias,
            **dense,
        )
        kv = {"axes": ("embed", "kv_heads"), "use_bias": c.qkv_bias, **dense}
        self.k_proj = Linear(c.hidden_size, kv_width, **kv) if own_kv else None
        self.v_proj = Linear(c.hidden_size, kv_width, **kv) if own_values else None
        self.o_proj = Linear(
            q_width, c.hidden_size, axes=("q_heads", "embed"), use_bias=c.o_bias, **dense
        )
        norm = {"eps": c.rms_norm_eps, "plus_one": c.gemma_norms, "param_dtype": param_dtype}
        # Over each head's E, or (qk_norm_full, OLMo) over the whole projection H*E / K*E.
        self.qk_norm_full = c.qk_norm_full
        q_norm_width, k_norm_width = (q_width, kv_width) if c.qk_norm_full else (self.head_dim,) * 2
        self.q_norm = RMSNorm(q_norm_width, **norm) if c.qk_norm else None
        self.k_norm = RMSNorm(k_norm_width, **norm) if c.qk_norm and own_kv else None
        self.v_norm_eps = c.rms_norm_eps if c.v_norm else None  # Gemma 4: no scale
        # gpt-oss: one learned logit per query head joins every softmax (and takes its share of
        # the probability, attending to nothing): the einsum and blockwise paths compute it.
        self.sinks = (
            nnx.Param(normal_init(rngs, (c.num_heads,), param_dtype), logical_axes=(None,))
            if c.attention_sinks
            else None
        )

    def __call__(
        self,
        x_BxTxD: jax.Array,
        positions_BxT: jax.Array,
        segment_ids_BxT: jax.Array,
        dropout_key: jax.Array | None = None,
        prefix: KVPrefix | None = None,
        shared_kv: tuple[jax.Array, jax.Array] | None = None,
        image_groups_BxT: jax.Array | None = None,
    ):
        """Output [B, T, D]; shared_kv: the keys and values [B, S, K, E] to attend with in place
        of this layer's own (KV sharing), as keys_values computes them; image_groups_BxT: image
        tokens that attend bidirectionally within their image (einsum path only)."""
        if image_groups_BxT is not None:
            self._check_images()
        if self.sinks is not None and self.kind not in ("xla", "blockwise"):
            raise UnsupportedModelError(
                f"attention={self.kind!r} has no attention sinks (gpt-oss); set "
                "config.model.attention='blockwise' or 'xla' (or 'auto', which picks one)."
            )
        q_BxTxKxGxE, gate = self.queries(x_BxTxD, positions_BxT, dropout_key)
        if shared_kv is None:
            shared_kv = self.keys_values(x_BxTxD, positions_BxT, dropout_key)
        k_BxSxKxE, v_BxSxKxE = shared_kv
        if prefix is not None:  # the fused kernels take no prefix: config_check refuses them
            mask_BxTxS = attention_mask(
                segment_ids_BxT, positions_BxT, self.window, image_groups_BxT
            )
            k_BxSxKxE, v_BxSxKxE, mask_BxTxS = with_prefix(
                prefix, k_BxSxKxE, v_BxSxKxE, mask_BxTxS, positions_BxT, self.window
            )
            return self._attend(
                q_BxTxKxGxE, k_BxSxKxE, v_BxSxKxE, mask_BxTxS, fold_key(dropout_key, 3), gate
            )
        shards = context_shards()
        if shards > 1 and x_BxTxD.shape[1] % shards == 0:  # the sequence split over context
            out_BxTxHE = self._context_parallel(
                q_BxTxKxGxE, k_BxSxKxE, v_BxSxKxE, segment_ids_BxT, positions_BxT
            )
            return self._output(out_BxTxHE, fold_key(dropout_key, 3), gate)
        out_BxTxHE = self._segment_kernel(q_BxTxKxGxE, k_BxSxKxE, v_BxSxKxE, segment_ids_BxT)
        if out_BxTxHE is not None:
            return self._output(out_BxTxHE, fold_key(dropout_key, 3), gate)
        mask_BxTxS = attention_mask(segment_ids_BxT, positions_BxT, self.window, image_groups_BxT)
        if self.kind == "cudnn":
            out_BxTxHE = kernels.fused_attention(
                q_BxTxKxGxE, k_BxSxKxE, v_BxSxKxE, mask_BxTxS, self.scale, self.window
            )
            return self._output(out_BxTxHE, fold_key(dropout_key, 3), gate)
        key = fold_key(dropout_key, 3)
        return self._attend(q_BxTxKxGxE, k_BxSxKxE, v_BxSxKxE, mask_BxTxS, key, gate)

    def _check_images(self) -> None:
        """Only the einsum path masks images' bidirectional blocks."""
        if self.kind != "xla" or context_shards() > 1:
            raise UnsupportedModelError(
                f"attention={self.kind!r} (or a sequence split over mesh.context) cannot attend "
                "bidirectionally within images, as image-text models need; set "
                "config.model.attention='xla' and mesh.context=1."
            )

    def _segment_kernel(
        self,
        q_BxTxKxGxE: jax.Array,
        k_BxSxKxE: jax.Array,
        v_BxSxKxE: jax.Array,
        segment_ids_BxT: jax.Array,
    ) -> jax.Array | None:
        """[B, T, H*E] from this layer's kernel that keeps documents apart by segment ids
        (splash, blockwise, cuDNN's packed layout); None where the layer takes a mask instead
        (the einsum path, cuDNN without its packed layout)."""
        qkv = (q_BxTxKxGxE, k_BxSxKxE, v_BxSxKxE, segment_ids_BxT, self.scale, self.window)
        if self.kind == "splash":
            return kernels.splash_attention(*qkv, self.softcap)
        if self.kind == "blockwise":
            sinks = None if self.sinks is None else self.sinks[...].reshape(self.num_kv_heads, -1)
            return blockwise.blockwise_attention(*qkv, self.softcap, sinks)
        if self.kind == "cudnn" and self.max_segments and kernels.packed_cudnn_supported():
            return kernels.cudnn_packed_attention(*qkv, self.max_segments)
        return None

    def _context_parallel(
        self,
        q_BxTxKxGxE: jax.Array,
        k_BxSxKxE: jax.Array,
        v_BxSxKxE: jax.Array,
        segment_ids_BxT: jax.Array,
        positions_BxT: jax.Array,
    ) -> jax.Array:
        """Attention with the sequence split over the mesh's context axis: each device's
        queries against the gathered keys (models/partitioning.py), masked by segment and
        position, as tokens come in load-balanced order. Output [B, T, H * E]."""
        if self.kind == "splash":
            raise UnsupportedModelError(
                "attention='splash' cannot run with the sequence split over mesh.context: its "
                "causal tiles assume tokens in order. Set config.model.attention='blockwise' (or "
                "mesh.context=1)."
            )
        if self.kind == "blockwise" and self.sinks is not None:
            raise UnsupportedModelError(
                "attention='blockwise' with the sequence split over mesh.context has no "
                "attention sinks (gpt-oss): set config.model.attention='xla' (or mesh.context=1)."
            )
        if self.kind == "blockwise":  # in blocks: no [T / C, T] scores
            out_BxTxKxGxE = self._context_blockwise(
                q_BxTxKxGxE, k_BxSxKxE, v_BxSxKxE, segment_ids_BxT
            )
        else:
            out_BxTxKxGxE = context_attention(
                self._context_masked,
                q_BxTxKxGxE,
                k_BxSxKxE,
                v_BxSxKxE,
                segment_ids_BxT,
                positions_BxT,
            )
        batch, seq_len = q_BxTxKxGxE.shape[:2]
        return out_BxTxKxGxE.reshape(batch, seq_len, self.num_heads * self.head_dim)

    def _context_masked(
        self,
        q: jax.Array,
        k: jax.Array,
        v: jax.Array,
        q_segment_ids: jax.Array,
        q_positions: jax.Array,
        kv_segment_ids: jax.Array,
        kv_positions: jax.Array,
    ) -> jax.Array:
        """One context shard's attention through a [B, T / C, T] mask (einsums or cuDNN)."""
        mask_BxTxS = position_mask(
            q_segment_ids, q_positions, kv_segment_ids, kv_positions, self.window
        )
        if self.kind == "cudnn":  # the mask path: cuDNN's causal tiles assume order too
            return kernels.masked_attention(q, k, v, mask_BxTxS, self.scale)
        return self._weighted_values(q, k, v, mask_BxTxS)

    def _context_blockwise(
        self,
        q_BxTxKxGxE: jax.Array,
        k_BxSxKxE: jax.Array,
        v_BxSxKxE: jax.Array,
        segment_ids_BxT: jax.Array,
    ) -> jax.Array:
        """The blockwise kernel on each context shard: its queries against the gathered keys,
        every token placed by its index in the row (context_layout's order gives it), so that
        causality, the window and the skipping of unseen blocks count in the row's order."""
        batch, seq_len = segment_ids_BxT.shape
        order_T = jnp.asarray(balanced_order(seq_len, context_shards()), jnp.int32)
        index_BxT = jnp.broadcast_to(order_T, (batch, seq_len))  # rows share their order

        def local(q, k, v, q_segment_ids, q_index, kv_segment_ids, kv_index):
            return blockwise.flash_attention(
                q,
                k,
                v,
                (q_segment_ids, kv_segment_ids),
                (q_index[0], kv_index[0]),
                self.scale,
                self.window,
                self.softcap,
            )

        return context_attention(
            local, q_BxTxKxGxE, k_BxSxKxE, v_BxSxKxE, segment_ids_BxT, index_BxT
        )

    def extend(
        self,
        x_BxTxD: jax.Array,
        positions_BxT: jax.Array,
        cache: LayerCache,
        prefix: KVPrefix | None = None,
    ) -> tuple[jax.Array, LayerCache]:
        """Writes the T new keys/values at slot cache.index and attends over the cache (after
        the prefix, where given); returns the output and the cache with the new keys and
        values. cache.images: an image-text model's rotary positions and image groups."""
        images = cache.images
        rope_BxT = positions_BxT if images is None else images.rope_positions
        q_BxTxKxGxE, gate = self.queries(x_BxTxD, rope_BxT, None)
        if self.own_kv:  # else: `cache` is the layer's it shares, written already
            k_BxTxKxE, v_BxTxKxE = self.keys_values(x_BxTxD, rope_BxT, None)
            cache = dataclasses.replace(
                cache,
                keys_BxSxKxE=write_slots(cache.keys_BxSxKxE, k_BxTxKxE, cache.index),
                values_BxSxKxE=write_slots(cache.values_BxSxKxE, v_BxTxKxE, cache.index),
            )
        mask_BxTxS = cache_mask(positions_BxT, cache.key_positions_BxS, self.window, images)
        keys_BxSxKxE, values_BxSxKxE = cache.keys_BxSxKxE, cache.values_BxSxKxE
        if prefix is not None:
            keys_BxSxKxE, values_BxSxKxE, mask_BxTxS = with_prefix(
                prefix, keys_BxSxKxE, values_BxSxKxE, mask_BxTxS, positions_BxT, self.window
            )
        out_BxTxD = self._attend(q_BxTxKxGxE, keys_BxSxKxE, values_BxSxKxE, mask_BxTxS, None, gate)
        return out_BxTxD, cache

    def queries(
        self, x_BxTxD: jax.Array, positions_BxT: jax.Array, dropout_key: jax.Array | None
    ) -> tuple[jax.Array, jax.Array | None]:
        """Queries [B, T, K, G, E], normed and rotated, and the output gate [B, T, H*E] (None
        without attn_output_gate)."""
        batch, seq_len, _ = x_BxTxD.shape
        q_BxTxHxE = self.q_proj(x_BxTxD, fold_key(dropout_key, 0))
        gate = None
        if self.gated:  # per head: E queries, then E gate values (Qwen3.5)
            q_gate = q_BxTxHxE.reshape(batch, seq_len, self.num_heads, 2 * self.head_dim)
            q_BxTxHxE = q_gate[..., : self.head_dim]
            gate = q_gate[..., self.head_dim :].reshape(batch, seq_len, -1)
        if self.q_norm is not None and self.qk_norm_full:  # still [B, T, H*E]
            q_BxTxHxE = self.q_norm(q_BxTxHxE)
        q_BxTxHxE = q_BxTxHxE.reshape(batch, seq_len, self.num_heads, self.head_dim)
        if self.q_norm is not None and not self.qk_norm_full:
            q_BxTxHxE = self.q_norm(q_BxTxHxE)
        if self.rope is not None:
            q_BxTxHxE = apply_rope(q_BxTxHxE, positions_BxT, self.rope)
        groups = self.num_heads // self.num_kv_heads
        return q_BxTxHxE.reshape(batch, seq_len, self.num_kv_heads, groups, self.head_dim), gate

    def keys_values(
        self, x_BxTxD: jax.Array, positions_BxT: jax.Array, dropout_key: jax.Array | None
    ) -> tuple[jax.Array, jax.Array]:
        """Keys [B, S, K, E] (normed, rotated) and values [B, S, K, E] (v-normed where the
        family does; the k projection itself where the layer has no v_proj)."""
        batch, seq_len, _ = x_BxTxD.shape
        k_BxSxKxE = self.k_proj(x_BxTxD, fold_key(dropout_key, 1))
        v_BxSxKxE = k_BxSxKxE
        if self.v_proj is not None:
            v_BxSxKxE = self.v_proj(x_BxTxD, fold_key(dropout_key, 2))
        if self.k_norm is not None and self.qk_norm_full:  # still [B, T, K*E]
            k_BxSxKxE = self.k_norm(k_BxSxKxE)
        k_BxSxKxE = k_BxSxKxE.reshape(batch, seq_len, self.num_kv_heads, self.head_dim)
        v_BxSxKxE = v_BxSxKxE.reshape(batch, seq_len, self.num_kv_heads, self.head_dim)
        if self.k_norm is not None and not self.qk_norm_full:
            k_BxSxKxE = self.k_norm(k_BxSxKxE)
        if self.v_norm_eps is not None:
            v_BxSxKxE = rms_normalize(v_BxSxKxE, self.v_norm_eps)
        if self.rope is not None:
            k_BxSxKxE = apply_rope(k_BxSxKxE, positions_BxT, self.rope)
        return k_BxSxKxE, v_BxSxKxE

    def _attend(
        self,
        q_BxTxKxGxE: jax.Array,
        k_BxSxKxE: jax.Array,
        v_BxSxKxE: jax.Array,
        mask_BxTxS: jax.Array,
        dropout_key: jax.Array | None,
        gate: jax.Array | None = None,
    ) -> jax.Array:
        batch, seq_len = q_BxTxKxGxE.shape[:2]
        out_BxTxKxGxE = self._weighted_values(q_BxTxKxGxE, k_BxSxKxE, v_BxSxKxE, mask_BxTxS)
        out_BxTxHE = out_BxTxKxGxE.reshape(batch, seq_len, self.num_heads * self.head_dim)
        return self._output(out_BxTxHE, dropout_key, gate)

    def _output(
        self, out_BxTxHE: jax.Array, dropout_key: jax.Array | None, gate: jax.Array | None
    ) -> jax.Array:
        """o_proj of the heads' outputs, gated first where the family gates them."""
        if gate is not None:
            out_BxTxHE = out_BxTxHE * jax.nn.sigmoid(gate)
        return self.o_proj(out_BxTxHE, dropout_key)

    def _weighted_values(
        self,
        q_BxTxKxGxE: jax.Array,
        k_BxSxKxE: jax.Array,
        v_BxSxKxE: jax.Array,
        mask_BxTxS: jax.Array,
    ) -> jax.Array:
        """softmax(q.k * scale, soft-capped, masked) . v: [B, T, K, G, E], the einsum path."""
        scores = einsum_f32("BTKGE,BSKE->BKGTS", q_BxTxKxGxE, k_BxSxKxE)
        scores = scores * self.scale
        if self.softcap is not None:
            scores = jnp.tanh(scores / self.softcap) * self.softcap
        scores = jnp.where(mask_BxTxS[:, None, None], scores, jnp.finfo(jnp.float32).min)
        if self.sinks is None:
            probs = jax.nn.softmax(scores, axis=-1)
        else:
            probs = softmax_with_sinks(scores, self.sinks[...].reshape(scores.shape[1:3]))
        return jnp.einsum("BKGTS,BSKE->BTKGE", probs.astype(v_BxSxKxE.dtype), v_BxSxKxE)


def softmax_with_sinks(scores_BxKxGxTxS: jax.Array, sinks_KxG: jax.Array) -> jax.Array:
    """softmax over S of the scores with one more logit per head (its sink) in the denominator,
    that logit's probability dropped: rows sum to 1 - p(sink). float32."""
    batch, _, _, seq_len, _ = scores_BxKxGxTxS.shape
    sinks_BxKxGxTx1 = jnp.broadcast_to(
        sinks_KxG.astype(jnp.float32)[None, :, :, None, None],
        (batch, *sinks_KxG.shape, seq_len, 1),
    )
    combined = jnp.concatenate([scores_BxKxGxTxS, sinks_BxKxGxTx1], axis=-1)
    return jax.nn.softmax(combined, axis=-1)[..., :-1]
