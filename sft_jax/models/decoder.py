"""The causal decoder shared by every family (Llama, Mistral, Qwen2/3, Gemma 2/3, SmolLM3,
OLMo 3, and the mixtures of experts Qwen3-MoE, Mixtral, Qwen2-MoE, gpt-oss, DeepSeek-V3: their
expert blocks in moe.py and moe_gpt_oss.py, DeepSeek-V3's latent attention in mla.py), in Flax
NNX.

Dimension legend for einsum strings and shape suffixes:
  B batch, T query time, S key time, D model width, H query heads, K key/value heads,
  G query heads per key/value head (H = K * G), E head dim, F MLP width, V vocabulary.

Parameters carry logical axis names in their `logical_axes` metadata; models/partitioning.py
maps them to mesh axes. Attention (and its fused kernels) lives in attention.py and kernels.py,
the building blocks in layers.py. Inputs are packed rows (see attention.py).

Hooks for adapters that add inputs rather than weights (sft_jax.adapters.prompts sets them; nothing
here knows them): `virtual_tokens`, a module whose call gives N embeddings [N, D] that input
ids -1, -2, ..., -N stand for (prompt tuning, P-tuning); `kv_prefix`, a module whose call gives
every layer's KVPrefix (prefix tuning: the tokens' positions then start at N, as Hugging Face
counts a `past_key_values` prefix); and `embedding_noise`, NEFTune's alpha: uniform noise of
magnitude alpha / sqrt(T * D) on the token embeddings in training (where a dropout key is
given), never at eval or in generation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sft_jax.models.attention import Attention
from sft_jax.models.config import ModelConfig, UnsupportedModelError
from sft_jax.models.gemma4_moe import Gemma4Experts
from sft_jax.models.image_decoding import image_inputs
from sft_jax.models.kernels.fused import ATTENTION_KINDS
from sft_jax.models.kv_cache import KVCache, KVPrefix, LayerCache, write_slots
from sft_jax.models.layers import (
    MLP,
    Linear,
    RMSNorm,
    einsum_f32,
    fold_key,
    head_logits,
    normal_init,
)
from sft_jax.models.linear_attention import LINEAR_PROJECTIONS, GatedDeltaNet
from sft_jax.models.mla import MLA_ONLY_PROJECTIONS, MLAttention
from sft_jax.models.moe import MoEBlock, RouterStats, stack_stats
from sft_jax.models.moe_gpt_oss import GptOssMoEBlock
from sft_jax.models.partitioning import logical_to_spec
from sft_jax.models.per_layer import PerLayerEmbeddings, PerLayerInput, layer_scalar
from sft_jax.models.vision import place_images, vision_part

# What each decoder layer keeps for the backward pass: everything, nothing (recompute the
# layer), or only matmul outputs (recompute the cheap elementwise work), on the device or
# offloaded to host memory.
REMAT_POLICIES = {
    "none": None,
    # Keeps the weight matmuls' outputs (no batch dims); recomputes the rest, attention scores
    # included ([B, K, G, T, S] per layer would not fit at long sequence lengths).
    "save_matmuls": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # The same matmul outputs, kept in pinned host memory instead of the device's: copied out
    # in the forward pass, back in the backward one (GPUs and TPUs; the CPU backend has no
    # separate host memory and config_check refuses it there).
    "offload": jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host"),
    "full": jax.checkpoint_policies.nothing_saveable,
}


# The linear layers of a decoder layer, by the names Hugging Face checkpoints give them.
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
# Every attention projection name, latent attention's (DeepSeek-V3) included.
ATTENTION_NAMES = ATTENTION_PROJECTIONS + MLA_ONLY_PROJECTIONS


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerInputs:
    """What a decoder layer takes beyond the residual stream, where its family has it: its
    per-layer input embeddings [B, T, P] (PLE) and the keys and values [B, S, K, E] of the
    earlier layer it shares them with."""

    per_layer_input: jax.Array | None = None
    shared_kv: tuple[jax.Array, jax.Array] | None = None
    image_groups: jax.Array | None = None  # [B, T] (models/gemma3_vision.py image_groups)


def _normed(norm: RMSNorm | None, x_BxTxD: jax.Array) -> jax.Array:
    return x_BxTxD if norm is None else norm(x_BxTxD)


class DecoderLayer(nnx.Module):
    """Pre-norm residual block; Gemma adds norms on the attention and MLP outputs, OLMo keeps
    only those (post_norms: no norm before attention or the MLP)."""

    def __init__(self, config: ModelConfig, layer_index: int, *, dtype, param_dtype, rngs):
        c = config
        norm = {"eps": c.rms_norm_eps, "plus_one": c.gemma_norms, "param_dtype": param_dtype}
        pre, post = not c.post_norms, c.sandwich_norms or c.post_norms
        self.attn_norm = RMSNorm(c.hidden_size, **norm) if pre else None
        # Qwen3.5's "linear_attention" layers hold a Gated DeltaNet in the attention's place.
        mixer = MLAttention if c.mla else Attention
        if c.layer_types[layer_index] == "linear_attention":
            mixer = GatedDeltaNet
        self.attn = mixer(c, layer_index, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.attn_post_norm = RMSNorm(c.hidden_size, **norm) if post else None
        self.mlp_norm = RMSNorm(c.hidden_size, **norm) if pre else None
        dense = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        if c.is_moe_layer(layer_index):
            moe_class = GptOssMoEBlock if c.expert_names == "gpt_oss" else MoEBlock
            self.mlp = moe_class(c, **dense)
        else:
            self.mlp = MLP(c, width=c.mlp_width_of(layer_index), **dense)
        self.mlp_post_norm = RMSNorm(c.hidden_size, **norm) if post else None
        # Gemma 4: per-layer input embeddings (models/per_layer.py) and an output scalar.
        self.per_layer_input = PerLayerInput(c, **dense) if c.per_layer_input_size else None
        self.layer_scalar = layer_scalar(param_dtype) if c.layer_scalars else None
        self.experts = Gemma4Experts(c, **dense) if c.parallel_experts else None
        # Whether later layers attend with this layer's keys/values (KV sharing).
        self.shares_kv = any(c.kv_source_of(i) == layer_index != i for i in range(c.num_layers))

    def __call__(
        self,
        x_BxTxD: jax.Array,
        positions_BxT: jax.Array,
        segment_ids_BxT: jax.Array,
        dropout_key: jax.Array | None = None,
        prefix: KVPrefix | None = None,
        inputs: LayerInputs | None = None,
    ) -> tuple[jax.Array, RouterStats | None, tuple[jax.Array, jax.Array] | None]:
        """(output, router statistics over real tokens (None for a dense MLP), this layer's
        keys and values where later layers share them (else None))."""
        inputs = inputs or LayerInputs()
        normed = _normed(self.attn_norm, x_BxTxD)
        kv = inputs.shared_kv
        if kv is None and self.shares_kv:
            kv = self.attn.keys_values(normed, positions_BxT, fold_key(dropout_key, 0))
        images = {} if inputs.image_groups is None else {"image_groups_BxT": inputs.image_groups}
        attn_out = self.attn(
            normed, positions_BxT, segment_ids_BxT, fold_key(dropout_key, 0), prefix, kv, **images
        )
        x_BxTxD, stats = self._add_attention_and_mlp(
            x_BxTxD, attn_out, segment_ids_BxT > 0, fold_key(dropout_key, 1)
        )
        x_BxTxD = self._per_layer_tail(x_BxTxD, inputs.per_layer_input, fold_key(dropout_key, 2))
        return x_BxTxD, stats, kv if self.shares_kv else None

    def extend(
        self,
        x_BxTxD: jax.Array,
        positions_BxT: jax.Array,
        cache: LayerCache,
        prefix: KVPrefix | None = None,
        per_layer_input: jax.Array | None = None,
    ) -> tuple[jax.Array, LayerCache]:
        """The layer on T new tokens against its cache (see Attention.extend)."""
        attn_out, cache = self.attn.extend(
            _normed(self.attn_norm, x_BxTxD), positions_BxT, cache, prefix
        )
        x_BxTxD, _ = self._add_attention_and_mlp(x_BxTxD, attn_out, positions_BxT >= 0, None)
        return self._per_layer_tail(x_BxTxD, per_layer_input, None), cache

    def _per_layer_tail(
        self, x_BxTxD: jax.Array, per_layer_input: jax.Array | None, key: jax.Array | None
    ) -> jax.Array:
        """Gemma 4's per-layer input block and layer scalar (nothing for other families)."""
        if self.per_layer_input is not None:
            x_BxTxD = self.per_layer_input(x_BxTxD, per_layer_input, key)
        if self.layer_scalar is not None:
            x_BxTxD = x_BxTxD * self.layer_scalar[...][0].astype(x_BxTxD.dtype)
        return x_BxTxD

    def _add_attention_and_mlp(
        self,
        x_BxTxD: jax.Array,
        attn_out: jax.Array,
        real_BxT: jax.Array,
        dropout_key: jax.Array | None,
    ) -> tuple[jax.Array, RouterStats | None]:
        if self.attn_post_norm is not None:
            attn_out = self.attn_post_norm(attn_out)
        x_BxTxD = x_BxTxD + attn_out
        stats = None
        if isinstance(self.mlp, MoEBlock):
            mlp_out, stats = self.mlp(_normed(self.mlp_norm, x_BxTxD), real_BxT, dropout_key)
        else:
            mlp_out = self.mlp(_normed(self.mlp_norm, x_BxTxD), dropout_key)
        if self.experts is not None:  # Gemma 4: experts beside the dense MLP
            mlp_out = self.experts(x_BxTxD, mlp_out)
        if self.mlp_post_norm is not None:
            mlp_out = self.mlp_post_norm(mlp_out)
        return x_BxTxD + mlp_out, stats


def use_attention(model: CausalLM, kind: str, max_segments: int | None = None) -> None:
    """Switches the attention kernel of every layer (the parameters stay as they are), and the
    bound on segments per row where given (see ModelConfig.max_segments)."""
    if kind not in ATTENTION_KINDS:
        raise ValueError(f"attention={kind!r}: expected one of {ATTENTION_KINDS}.")
    if max_segments is None:
        max_segments = model.config.max_segments
    model.config = dataclasses.replace(model.config, attention=kind, max_segments=max_segments)
    for layer in model.layers:
        layer.attn.kind, layer.attn.max_segments = kind, max_segments


def _call_layer(
    layer: DecoderLayer, x_BxTxD, positions_BxT, segment_ids_BxT, key, prefix=None, inputs=None
) -> tuple[jax.Array, RouterStats | None, tuple[jax.Array, jax.Array] | None]:
    return layer(x_BxTxD, positions_BxT, segment_ids_BxT, key, prefix, inputs)


class CausalLM(nnx.Module):
    """Decoder-only language model: embed, N decoder layers, final norm, LM head (or, for a
    reward model, a score head: ModelConfig.score_labels)."""

    def __init__(
        self,
        config: ModelConfig,
        *,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        remat: str = "none",
        rngs: nnx.Rngs,
    ):
        c = config
        if remat not in REMAT_POLICIES:
            raise ValueError(f"remat={remat!r}: expected one of {', '.join(REMAT_POLICIES)}.")
        self.config = config
        self.dtype = dtype
        self.remat = remat
        self.embed = nnx.Param(
            normal_init(rngs, (c.vocab_size, c.hidden_size), param_dtype),
            logical_axes=("vocab", "embed"),
        )
        self.layers = nnx.List(
            [
                DecoderLayer(c, i, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                for i in range(c.num_layers)
            ]
        )
        self.final_norm = RMSNorm(
            c.hidden_size, eps=c.rms_norm_eps, plus_one=c.gemma_norms, param_dtype=param_dtype
        )
        self.per_layer_embed = (
            PerLayerEmbeddings(c, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
            if c.per_layer_input_size
            else None
        )
        self.lm_head = (
            None
            if c.tie_word_embeddings or c.score_labels
            else nnx.Param(
                normal_init(rngs, (c.vocab_size, c.hidden_size), param_dtype),
                logical_axes=("vocab", "embed"),
            )
        )
        # A reward model's head (transformers' *ForSequenceClassification: `score`, no bias).
        self.score = (
            nnx.Param(
                normal_init(rngs, (c.score_labels, c.hidden_size), param_dtype),
                logical_axes=(None, "embed"),
            )
            if c.score_labels
            else None
        )
        # An image-text model's vision part (models/vision.py); None for a text model.
        self.vision = vision_part(c, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        # Adapter hooks (see the module docstring); None / 0 in a plain model.
        self.virtual_tokens = nnx.data(None)
        self.kv_prefix = nnx.data(None)
        self.embedding_noise = 0.0

    def hidden_states(
        self,
        input_ids_BxT: jax.Array,
        positions_BxT: jax.Array,
        segment_ids_BxT: jax.Array,
        dropout_key: jax.Array | None = None,
        images: dict[str, jax.Array] | None = None,
    ) -> jax.Array:
        """Final-normed hidden states [B, T, D] in the compute dtype.

        dropout_key enables LoRA dropout (training); None means deterministic. images: an
        image-text model's image fields by batch name, each [B, *per_row].
        """
        return self.forward(input_ids_BxT, positions_BxT, segment_ids_BxT, dropout_key, images)[0]

    def forward(
        self,
        input_ids_BxT: jax.Array,
        positions_BxT: jax.Array,
        segment_ids_BxT: jax.Array,
        dropout_key: jax.Array | None = None,
        images: dict[str, jax.Array] | None = None,
    ) -> tuple[jax.Array, RouterStats | None]:
        """(final-normed hidden states, router statistics of the MoE layers stacked [L, ...],
        or None for a dense model). images: the batch's image fields by name, whose embeddings
        replace the rows' image tokens in order (models/vision.py)."""
        x_BxTxD = self._embed(input_ids_BxT, fold_key(dropout_key, len(self.layers)))
        x_BxTxD, positions_BxT, groups_BxT = place_images(
            self.vision, input_ids_BxT, segment_ids_BxT, positions_BxT, x_BxTxD, images
        )
        ple_BxTxLxP = self._per_layer_inputs(input_ids_BxT, x_BxTxD)
        prefixes, positions_BxT = self._prefixes(positions_BxT)
        apply_layer = _call_layer
        if self.remat != "none":
            apply_layer = nnx.remat(_call_layer, policy=REMAT_POLICIES[self.remat])
        per_layer, shared = [], {}
        for index, (layer, prefix) in enumerate(zip(self.layers, prefixes, strict=True)):
            key = fold_key(dropout_key, index)
            inputs = LayerInputs(
                None if ple_BxTxLxP is None else ple_BxTxLxP[:, :, index],
                shared.get(self.config.kv_source_of(index)),
                groups_BxT,
            )
            x_BxTxD, stats, kv = apply_layer(
                layer, x_BxTxD, positions_BxT, segment_ids_BxT, key, prefix, inputs
            )
            if kv is not None:
                shared[index] = kv
            if stats is not None:
                per_layer.append(stats)
        return self.final_norm(x_BxTxD), stack_stats(per_layer)

    def extend(
        self, input_ids_BxT: jax.Array, positions_BxT: jax.Array, cache: KVCache, images=None
    ) -> tuple[jax.Array, KVCache]:
        """Final-normed hidden states [B, T, D] of T new tokens (a prefill's images: see
        image_decoding.py), attending to the cache and written to it at slots [cache.index,
        cache.index + T); positions < 0 mark padding."""
        prefixes, shifted_BxT = self._prefixes(positions_BxT)
        positions_BxT = jnp.where(positions_BxT >= 0, shifted_BxT, positions_BxT)
        slots = (write_slots(cache.positions_BxS, positions_BxT, cache.index), cache.index)
        x_BxTxD, context, delta_B = image_inputs(self, input_ids_BxT, positions_BxT, images, cache)
        ple_BxTxLxP = self._per_layer_inputs(input_ids_BxT, x_BxTxD)
        keys, values, written, states = [], [], [], list(cache.states)
        for index, (layer, prefix, layer_keys, layer_values) in enumerate(
            zip(self.layers, prefixes, cache.keys, cache.values, strict=True)
        ):
            ple = None if ple_BxTxLxP is None else ple_BxTxLxP[:, :, index]
            source = self.config.kv_source_of(index)
            if states and states[index] is not None:  # a Gated DeltaNet: its own state
                layer_cache = states[index]
            elif source != index:  # KV sharing: the earlier layer's cache, this step's tokens in
                layer_cache = written[source]
            else:
                layer_cache = LayerCache(layer_keys, layer_values, *slots, context)
            x_BxTxD, layer_cache = layer.extend(x_BxTxD, positions_BxT, layer_cache, prefix, ple)
            written.append(layer_cache)
            if states and states[index] is not None:
                states[index] = layer_cache
                layer_cache = None
            own = layer_cache is not None and source == index
            keys.append(layer_cache.keys_BxSxKxE if own else layer_keys)
            values.append(layer_cache.values_BxSxKxE if own else layer_values)
        rest = (slots[0], cache.index + input_ids_BxT.shape[1], tuple(states), delta_B)
        return self.final_norm(x_BxTxD), KVCache(tuple(keys), tuple(values), *rest)

    def _per_layer_inputs(self, input_ids_BxT: jax.Array, x_BxTxD: jax.Array) -> jax.Array | None:
        """Gemma 4's per-layer input embeddings [B, T, L, P] (models/per_layer.py), or None."""
        if self.per_layer_embed is None:
            return None
        if self.virtual_tokens is not None:  # transformers has no PLE for them either
            raise UnsupportedModelError(
                f"{self.config.model_type}: prompt tuning's virtual tokens have no per-layer "
                "input embeddings (PLE); use LoRA or full fine-tuning with this model."
            )
        return self.per_layer_embed(input_ids_BxT, x_BxTxD)

    def _prefixes(self, positions_BxT: jax.Array) -> tuple[list[KVPrefix | None], jax.Array]:
        """(each layer's KV prefix or None, the positions the tokens then take)."""
        if self.kv_prefix is None:
            return [None] * len(self.layers), positions_BxT
        prefixes = self.kv_prefix()
        return list(prefixes), positions_BxT + prefixes[0].keys_NxKxE.shape[0]

    def _embed(self, input_ids_BxT: jax.Array, noise_key: jax.Array | None = None) -> jax.Array:
        """Token embeddings [B, T, D] in the compute dtype: looked up (ids < 0: the virtual
        tokens), scaled where the family does, with NEFTune's noise where a key is given."""
        virtual_BxT = input_ids_BxT < 0
        x_BxTxD = self.lookup_embeddings(jnp.where(virtual_BxT, 0, input_ids_BxT))
        if self.embedding_noise and noise_key is not None:
            # NEFTune as transformers' hook computes it: L is the row length (padding and
            # packed documents included), D the width.
            bound = self.embedding_noise / np.sqrt(x_BxTxD.shape[1] * x_BxTxD.shape[2])
            noise = jax.random.uniform(noise_key, x_BxTxD.shape, jnp.float32, -bound, bound)
            x_BxTxD = x_BxTxD + noise.astype(x_BxTxD.dtype)
        if self.virtual_tokens is not None:
            # Not scaled, not noised: transformers adds them after its embedding module.
            table_NxD = self.virtual_tokens().astype(x_BxTxD.dtype)
            index_BxT = jnp.clip(-1 - input_ids_BxT, 0, table_NxD.shape[0] - 1)
            x_BxTxD = jnp.where(virtual_BxT[..., None], jnp.take(table_NxD, index_BxT, 0), x_BxTxD)
        return x_BxTxD

    def lookup_embeddings(self, input_ids_BxT: jax.Array) -> jax.Array:
        """Rows of the embedding table, scaled where the family scales them, compute dtype."""
        embed_VxD = self.embed[...]
        mesh = jax.sharding.get_abstract_mesh()
        if not mesh.empty:
            # Gather the table's embed shards first (as FSDP does for every weight) and lay the
            # looked-up rows out like the batch: the partitioner cannot turn a table split over
            # fsdp into rows split over fsdp without replicating it ("involuntary full
            # rematerialization") on meshes that also split the vocabulary (tensor > 1).
            table = logical_to_spec(("vocab", None), embed_VxD.shape, mesh)
            embed_VxD = jax.lax.with_sharding_constraint(embed_VxD, table)
        x_BxTxD = jnp.take(embed_VxD, input_ids_BxT, axis=0)
        if not mesh.empty:
            rows = logical_to_spec(("batch", "sequence", None), x_BxTxD.shape, mesh)
            x_BxTxD = jax.lax.with_sharding_constraint(x_BxTxD, rows)
        if self.config.embed_scale:
            # transformers rounds sqrt(D) to the weight dtype before multiplying.
            x_BxTxD = x_BxTxD * jnp.asarray(np.sqrt(self.config.hidden_size), embed_VxD.dtype)
        return x_BxTxD.astype(self.dtype)

    def head(self) -> jax.Array:
        """The LM head [V, D] in the parameter dtype (the embedding where they are tied)."""
        if self.score is not None:
            raise ValueError("a reward model (score head) has no LM head: use scores().")
        return self.embed[...] if self.lm_head is None else self.lm_head[...]

    def logits(self, hidden_BxTxD: jax.Array) -> jax.Array:
        """float32 logits [..., V] of (a chunk of) hidden states, soft-capped where configured."""
        return head_logits(hidden_BxTxD, self.head(), self.config.final_logit_softcap)

    def scores(self, hidden_BxTxD: jax.Array) -> jax.Array:
        """A reward model's float32 outputs [B, T, N] at every position (transformers computes
        them the same way, then reads the last non-pad token of each sequence)."""
        return einsum_f32("BTD,ND->BTN", hidden_BxTxD, self.score[...].astype(hidden_BxTxD.dtype))

    def __call__(
        self, input_ids_BxT: jax.Array, positions_BxT: jax.Array, segment_ids_BxT: jax.Array
    ) -> jax.Array:
        return self.logits(self.hidden_states(input_ids_BxT, positions_BxT, segment_ids_BxT))


def decoder_linears(model: CausalLM) -> Iterator[tuple[int, str, Linear]]:
    """(layer index, projection name, module) of every linear layer in the decoder."""
    for index, layer in enumerate(model.layers):
        linear = isinstance(layer.attn, GatedDeltaNet)
        for name in LINEAR_PROJECTIONS if linear else layer.attn.projection_names:
            if getattr(layer.attn, name) is not None:  # none: KV sharing, k_eq_v (Gemma 4)
                yield index, name, getattr(layer.attn, name)
        if isinstance(layer.mlp, MLP):  # expert weights are stacked parameters, not Linears
            for name in MLP_PROJECTIONS:
                yield index, name, getattr(layer.mlp, name)
