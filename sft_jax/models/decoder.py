"""The causal decoder shared by every family (Llama, Mistral, Qwen2/3, Gemma 2/3), in Flax NNX.

Dimension legend for einsum strings and shape suffixes:
  B batch, T query time, S key time, D model width, H query heads, K key/value heads,
  G query heads per key/value head (H = K * G), E head dim, F MLP width, V vocabulary.

Parameters carry logical axis names in their `logical_axes` metadata; `sft_jax.sharding` maps
them to mesh axes. Nothing in this file knows about the mesh.

Inputs are packed rows: `positions_BxT` restart at 0 for every document and `segment_ids_BxT`
number the documents of a row (0 = padding). A token attends only to earlier tokens of its own
segment (and, in sliding-window layers, to the last `window` of them, itself included).

Generation runs tokens through `CausalLM.extend` against a `KVCache` instead: each token attends
to the cached slots that hold earlier positions of its own row (positions < 0 mark padding).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sft_jax.models.config import ModelConfig, RopeSpec, UnsupportedModelError
from sft_jax.quantize import dequantize

_INIT_STD = 0.02  # transformers' default initializer_range, for models not loaded from disk
# What each decoder layer keeps for the backward pass: everything, nothing (recompute the
# layer), or only matmul outputs (recompute the cheap elementwise work).
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    # Keeps the weight matmuls' outputs (no batch dims); recomputes the rest, attention scores
    # included ([B, K, G, T, S] per layer would not fit at long sequence lengths).
    "save_matmuls": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _broadcast_last(vector: jax.Array, ndim: int) -> jax.Array:
    """A [N] vector shaped [1, ..., 1, N] to scale the last axis of an ndim array."""
    return vector.reshape((1,) * (ndim - 1) + vector.shape)


def _normal(rngs: nnx.Rngs, shape: tuple[int, ...], dtype: jnp.dtype) -> jax.Array:
    return (_INIT_STD * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


class LoRAParam(nnx.Param):
    """Low-rank adapter weights: with LoRA, the parameters training updates."""


class Linear(nnx.Module):
    """y = x @ kernel (+ bias) (+ LoRA: scale * dropout(x) @ lora_a @ lora_b), kernel [in, out].

    The frozen kernel may be stored quantized (`quant`, see sft_jax.quantize); `sft_jax.lora`
    adds adapters and quantizes kernels after the model is built.
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
            _normal(rngs, (in_features, out_features), param_dtype), logical_axes=axes
        )
        self.bias = (
            nnx.Param(jnp.zeros((out_features,), param_dtype), logical_axes=(axes[1],))
            if use_bias
            else None
        )
        # Filled in later by sft_jax.lora; declared as data so that NNX tracks what they hold.
        self.quant = nnx.data(None)  # nnx.Dict of QuantizedState replacing `kernel` (QLoRA)
        self.quant_spec = None
        self.lora_a = nnx.data(None)  # LoRAParam [in, rank]
        self.lora_b = nnx.data(None)  # LoRAParam [rank, out], zero-initialized
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
        if self.lora_a is not None:
            if self.lora_dropout > 0 and dropout_key is not None:
                keep = jax.random.bernoulli(dropout_key, 1.0 - self.lora_dropout, x.shape)
                x = jnp.where(keep, x / (1.0 - self.lora_dropout), 0).astype(self.dtype)
            low_rank = jnp.einsum("...i,ir->...r", x, self.lora_a[...].astype(self.dtype))
            delta = jnp.einsum("...r,ro->...o", low_rank, self.lora_b[...].astype(self.dtype))
            y = y + (self.lora_scale * delta).astype(self.dtype)
        return y


def _fold(key: jax.Array | None, index: int) -> jax.Array | None:
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
    """Rotates the two halves of the last axis of x_[B, T, heads, E] by position * frequency."""
    head_dim = x_BTxE.shape[-1]
    inv_freq = jnp.asarray(rope.inverse_frequencies(head_dim))
    angles_BxTxHalf = positions_BxT.astype(jnp.float32)[:, :, None] * inv_freq[None, None, :]
    cos = jnp.cos(angles_BxTxHalf)[:, :, None, :]
    sin = jnp.sin(angles_BxTxHalf)[:, :, None, :]
    x32 = x_BTxE.astype(jnp.float32)
    first, second = x32[..., : head_dim // 2], x32[..., head_dim // 2 :]
    rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    return rotated.astype(x_BTxE.dtype)


def attention_mask(
    segment_ids_BxT: jax.Array, positions_BxT: jax.Array, window: int | None
) -> jax.Array:
    """[B, T, S] True where query t may attend key s: same segment, causal, inside the window."""
    seq_len = segment_ids_BxT.shape[1]
    same_segment = segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :]
    causal_TxS = jnp.arange(seq_len)[:, None] >= jnp.arange(seq_len)[None, :]
    mask_BxTxS = same_segment & causal_TxS[None]
    if window is not None:
        distance_BxTxS = positions_BxT[:, :, None] - positions_BxT[:, None, :]
        mask_BxTxS = mask_BxTxS & (distance_BxTxS < window)
    return mask_BxTxS


def cache_mask(
    positions_BxT: jax.Array, key_positions_BxS: jax.Array, window: int | None
) -> jax.Array:
    """[B, T, S] True where query t may attend cache slot s: a real, earlier (or same) position,
    inside the window. Padding and empty slots hold position -1 and are never attended."""
    distance_BxTxS = positions_BxT[:, :, None] - key_positions_BxS[:, None, :]
    mask_BxTxS = (key_positions_BxS[:, None, :] >= 0) & (distance_BxTxS >= 0)
    if window is not None:
        mask_BxTxS = mask_BxTxS & (distance_BxTxS < window)
    return mask_BxTxS


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Keys and values of every layer for the tokens written so far, slots [0, index)."""

    keys: tuple[jax.Array, ...]  # per layer [B, S, K, E]
    values: tuple[jax.Array, ...]  # per layer [B, S, K, E]
    positions_BxS: jax.Array  # int32 position of the token in each slot; -1: padding or empty
    index: jax.Array  # int32 scalar: the next slot to write

    @classmethod
    def empty(cls, config: ModelConfig, batch: int, length: int, dtype: jnp.dtype) -> KVCache:
        shape = (batch, length, config.num_kv_heads, config.head_dim)
        zeros = tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))
        return cls(zeros, zeros, jnp.full((batch, length), -1, jnp.int32), jnp.zeros((), jnp.int32))


def _write(cache_BxSx: jax.Array, new_BxTx: jax.Array, index: jax.Array) -> jax.Array:
    return jax.lax.dynamic_update_slice_in_dim(
        cache_BxSx, new_BxTx.astype(cache_BxSx.dtype), index, 1
    )


# jax.nn.dot_product_attention's implementation behind config attention="cudnn" (tests put
# None here: jax's own XLA path, to check our layout and masks on CPU).
FUSED_IMPLEMENTATION = {"cudnn": "cudnn"}
# cuDNN's attention with a packed layout (a table of segments per row), jax's own binding of
# it; tests put an emulation of the kernel's contract here to check our table on CPU.
PACKED_KERNEL = {"fn": None}
# Run the splash kernel in the Pallas interpreter (tests on CPU; far too slow for training).
SPLASH_INTERPRET = {"interpret": False}
ATTENTION_KINDS = ("xla", "cudnn", "splash")
SPLASH_BLOCKS = (512, 256, 128)  # the kernel's tile along both sequence axes, largest first


def splash_block(seq_len: int) -> int:
    """The splash kernel's tile for this sequence length; lengths must be multiples of 128."""
    for block in SPLASH_BLOCKS:
        if seq_len % block == 0:
            return block
    raise UnsupportedModelError(
        f"attention='splash' tiles the sequence by {SPLASH_BLOCKS[-1]} tokens, but this sequence "
        f"has {seq_len}: set config.data.max_length to a multiple of {SPLASH_BLOCKS[-1]}, or use "
        "attention='xla'."
    )


@functools.lru_cache(maxsize=64)
def _splash_kernel(
    seq_len: int, groups: int, window: int | None, softcap: float | None, interpret: bool
):
    """Pallas splash attention (TPU) for the G query heads sharing one key/value head: causal,
    or causal inside a window of `window` positions; segments come in at call time."""
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as splash,
    )
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_mask as masks,
    )

    block = splash_block(seq_len)
    shape = (seq_len, seq_len)
    # Rows are packed documents in order, so index distance is position distance within one.
    head_mask = (
        masks.CausalMask(shape)
        if window is None
        else masks.LocalMask(shape, window_size=(window - 1, 0), offset=0)
    )
    sizes = splash.BlockSizes(
        block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
        block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block,
    )  # fmt: skip
    with jax.ensure_compile_time_eval():  # the mask tables are constants, even mid-trace
        return splash.make_splash_mqa_single_device(
            masks.MultiHeadMask([head_mask] * groups),
            block_sizes=sizes,
            attn_logits_soft_cap=softcap,
            interpret=interpret,
        )


def _per_shard(local, q_BxTxKxGxE, k_BxSxKxE, v_BxSxKxE, segment_ids_BxT) -> jax.Array:
    """local(q, k, v, segment_ids) -> [B, T, K, G, E], run on each shard when a mesh is set
    (the train step sets one): rows split over the batch axes, key/value heads over tensor.
    Kernels that read a per-row table of the input then see only their own rows."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return local(q_BxTxKxGxE, k_BxSxKxE, v_BxSxKxE, segment_ids_BxT)
    from sft_jax.sharding import logical_to_spec

    kv_spec = logical_to_spec(("batch", None, "kv_heads", None), k_BxSxKxE.shape, mesh)
    q_spec = jax.sharding.PartitionSpec(*kv_spec[:3], None, None)
    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(q_spec, kv_spec, kv_spec, jax.sharding.PartitionSpec(kv_spec[0], None)),
        out_specs=q_spec,
        check_vma=False,  # custom kernels do not declare how outputs vary over the mesh
    )(q_BxTxKxGxE, k_BxSxKxE, v_BxSxKxE, segment_ids_BxT)


def splash_attention(
    q_BxTxKxGxE: jax.Array,
    k_BxSxKxE: jax.Array,
    v_BxSxKxE: jax.Array,
    segment_ids_BxT: jax.Array,
    scale: float,
    window: int | None,
    softcap: float | None,
) -> jax.Array:
    """Attention through the splash kernel: output [B, T, H * E]. Segment ids keep packed
    documents apart inside the kernel, which skips the tiles they mask out."""
    from jax.experimental.pallas.ops.tpu.splash_attention.splash_attention_kernel import (
        SegmentIds,
    )

    batch, seq_len, kv_heads, groups, head_dim = q_BxTxKxGxE.shape
    kernel = _splash_kernel(seq_len, groups, window, softcap, SPLASH_INTERPRET["interpret"])

    def one_head(q_GxTxE, k_SxE, v_SxE, segment_ids_T):
        ids = SegmentIds(q=segment_ids_T, kv=segment_ids_T)
        return kernel(q_GxTxE, k_SxE, v_SxE, segment_ids=ids)

    def local(q_BxTxKxGxE, k_BxSxKxE, v_BxSxKxE, segment_ids_BxT):
        q_BxKxGxTxE = jnp.transpose(q_BxTxKxGxE * scale, (0, 2, 3, 1, 4))  # the kernel never scales
        k_BxKxSxE = jnp.transpose(k_BxSxKxE, (0, 2, 1, 3))
        v_BxKxSxE = jnp.transpose(v_BxSxKxE, (0, 2, 1, 3))
        per_row = jax.vmap(one_head, in_axes=(0, 0, 0, None))  # over kv heads
        out_BxKxGxTxE = jax.vmap(per_row)(q_BxKxGxTxE, k_BxKxSxE, v_BxKxSxE, segment_ids_BxT)
        return jnp.transpose(out_BxKxGxTxE, (0, 3, 1, 2, 4))

    out_BxTxKxGxE = _per_shard(local, q_BxTxKxGxE, k_BxSxKxE, v_BxSxKxE, segment_ids_BxT)
    return out_BxTxKxGxE.reshape(batch, seq_len, kv_heads * groups * head_dim)


def segment_table(segment_ids_BxT: jax.Array, max_segments: int) -> tuple[jax.Array, ...]:
    """cuDNN's packed layout of each row: (lengths [B, M], starts [B, M + 1], fits [B]).

    Every run of equal segment ids is one segment, padding included (so every token belongs to
    one and gets a defined output); entries past a row's last segment are -1. `fits` is False
    for a row with more than M segments, whose table would be wrong.
    """
    batch = segment_ids_BxT.shape[0]
    new_run_BxT = jnp.concatenate(
        [jnp.ones((batch, 1), bool), segment_ids_BxT[:, 1:] != segment_ids_BxT[:, :-1]], axis=1
    )
    run_BxT = jnp.cumsum(new_run_BxT, axis=1, dtype=jnp.int32) - 1  # segment index of a token
    runs_B = run_BxT[:, -1] + 1
    one_hot_BxTxM = run_BxT[:, :, None] == jnp.arange(max_segments, dtype=jnp.int32)[None, None]
    lengths_BxM = jnp.sum(one_hot_BxTxM, axis=1, dtype=jnp.int32)
    starts_BxM = jnp.cumsum(lengths_BxM, axis=1, dtype=jnp.int32) - lengths_BxM
    present_BxM = jnp.arange(max_segments)[None, :] < runs_B[:, None]
    lengths_BxM = jnp.where(present_BxM, lengths_BxM, -1)
    starts_BxM = jnp.where(present_BxM, starts_BxM, -1)
    starts_BxM1 = jnp.concatenate([starts_BxM, jnp.full((batch, 1), -1, jnp.int32)], axis=1)
    return lengths_BxM, starts_BxM1, runs_B <= max_segments


def _packed_kernel():
    if PACKED_KERNEL["fn"] is not None:
        return PACKED_KERNEL["fn"]
    from jax._src.cudnn import fused_attention_stablehlo as cudnn

    return functools.partial(cudnn.dot_product_attention, mask_type=cudnn.MaskType.PADDING_CAUSAL)


def packed_cudnn_supported() -> bool:
    """Whether this jax and GPU run cuDNN's packed layout (jax's binding takes segment offsets;
    cuDNN runs it on Hopper and later). Else attention="cudnn" passes a [B, 1, T, S] mask."""
    return PACKED_KERNEL["fn"] is not None or _jax_packed_cudnn()


@functools.lru_cache(maxsize=1)
def _jax_packed_cudnn() -> bool:
    try:
        import inspect

        from jax._src.cudnn import fused_attention_stablehlo as cudnn

        takes_offsets = "q_offsets" in inspect.signature(cudnn.dot_product_attention).parameters
        return takes_offsets and cudnn.check_compute_capability("9.0")
    except Exception:  # another jax, or no CUDA backend: the public API's mask path
        return False


@functools.lru_cache(maxsize=1)
def _kv_offsets_use_key_heads() -> bool:
    """Whether jax turns key/value segment starts into element offsets with the key's own head
    count. Before jax-ml/jax#39521 it used the query's, so under GQA cuDNN read the keys of other
    tokens, silently. Asked of jax's conversion itself, on a tiny GQA case."""
    try:
        from jax._src.cudnn import fused_attention_stablehlo as cudnn

        starts = jnp.array([[0, 2, -1]], jnp.int32)
        lengths = jnp.array([[2, 2]], jnp.int32)
        query, key = jnp.zeros((1, 4, 2, 8), jnp.bfloat16), jnp.zeros((1, 4, 1, 8), jnp.bfloat16)
        with jax.ensure_compile_time_eval():
            kv_offsets = cudnn._fix_seqlen_offsets(lengths, lengths, starts, starts, query, key)[3]
        return int(kv_offsets.reshape(-1)[1]) == 2 * 1 * 8  # token 2 x (1 head x 8 dims)
    except Exception:  # another jax: assume the old conversion (repeating heads is always right)
        return False


def cudnn_packed_attention(
    q_BxTxKxGxE: jax.Array,
    k_BxSxKxE: jax.Array,
    v_BxSxKxE: jax.Array,
    segment_ids_BxT: jax.Array,
    scale: float,
    window: int | None,
    max_segments: int,
) -> jax.Array:
    """cuDNN flash attention over each segment of a row as its own causal sequence: output
    [B, T, H * E]. No mask or bias goes in; the kernel reads the segment table (lengths and
    starts, see segment_table) and skips every tile outside a segment's causal triangle.

    A row with more than `max_segments` segments (the data pipeline bounds them through
    config.data.max_documents_per_row) gives NaN outputs, never attention across documents.
    """
    batch, seq_len, kv_heads, groups, head_dim = q_BxTxKxGxE.shape
    kernel = _packed_kernel()

    def local(q_BxTxKxGxE, k_BxSxKxE, v_BxSxKxE, segment_ids_BxT):
        rows = q_BxTxKxGxE.shape[0]
        if groups > 1 and not _kv_offsets_use_key_heads():
            # This jax would place key/value segments by the query's stride: give keys and
            # values one head per query head (head k * G + g reads copy g of head k).
            k_BxSxKxE = jnp.repeat(k_BxSxKxE, groups, axis=2)
            v_BxSxKxE = jnp.repeat(v_BxSxKxE, groups, axis=2)
        lengths_BxM, starts_BxM1, fits_B = segment_table(segment_ids_BxT, max_segments)
        out_BxTxHxE = kernel(
            q_BxTxKxGxE.reshape(rows, seq_len, -1, head_dim), k_BxSxKxE, v_BxSxKxE,
            q_seqlen=lengths_BxM, kv_seqlen=lengths_BxM, q_offsets=starts_BxM1,
            kv_offsets=starts_BxM1, scale=scale, sliding_window_length=window,
        )  # fmt: skip
        out_BxTxHxE = jnp.where(fits_B[:, None, None, None], out_BxTxHxE, jnp.nan)
        return out_BxTxHxE.reshape(q_BxTxKxGxE.shape)

    out_BxTxKxGxE = _per_shard(local, q_BxTxKxGxE, k_BxSxKxE, v_BxSxKxE, segment_ids_BxT)
    return out_BxTxKxGxE.reshape(batch, seq_len, kv_heads * groups * head_dim)


def fused_attention(
    q_BxTxKxGxE: jax.Array,
    k_BxSxKxE: jax.Array,
    v_BxSxKxE: jax.Array,
    mask_BxTxS: jax.Array,
    scale: float,
    window: int | None,
) -> jax.Array:
    """Attention through jax.nn.dot_product_attention (a fused kernel): output [B, T, H * E].

    Query head h = k * G + g reads key/value head k, as in the einsum path; the packing,
    causal and window mask goes in whole, so segments never attend to each other. Causal and
    window are also named, so that cuDNN skips the tiles they rule out.
    """
    batch, seq_len, kv_heads, groups, head_dim = q_BxTxKxGxE.shape
    q_BxTxHxE = q_BxTxKxGxE.reshape(batch, seq_len, kv_heads * groups, head_dim)
    out_BxTxHxE = jax.nn.dot_product_attention(
        q_BxTxHxE, k_BxSxKxE, v_BxSxKxE, mask=mask_BxTxS[:, None], scale=scale, is_causal=True,
        local_window_size=None if window is None else (window - 1, 0),
        implementation=FUSED_IMPLEMENTATION["cudnn"],
    )  # fmt: skip
    return out_BxTxHxE.reshape(batch, seq_len, kv_heads * groups * head_dim)


class Attention(nnx.Module):
    """Grouped-query attention with RoPE, optional q/k norms, soft-capping and a window."""

    def __init__(self, config: ModelConfig, layer_index: int, *, dtype, param_dtype, rngs):
        c = config
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.scale = c.attention_scale
        self.softcap = c.attn_logit_softcap
        if c.attention not in ATTENTION_KINDS:
            raise ValueError(f"attention={c.attention!r}: expected one of {ATTENTION_KINDS}.")
        if c.attention == "cudnn" and self.softcap is not None:
            raise UnsupportedModelError(
                f"attention={c.attention!r} cannot soft-cap attention logits ({c.model_type});"
                " use attention='xla'."
            )
        self.kind, self.max_segments = c.attention, c.max_segments
        self.window = c.window_for(layer_index)
        self.rope = c.rope_for(c.layer_types[layer_index])
        dense = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        q_width, kv_width = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        self.q_proj = Linear(
            c.hidden_size, q_width, axes=("embed", "q_heads"), use_bias=c.qkv_bias, **dense
        )
        self.k_proj = Linear(
            c.hidden_size, kv_width, axes=("embed", "kv_heads"), use_bias=c.qkv_bias, **dense
        )
        self.v_proj = Linear(
            c.hidden_size, kv_width, axes=("embed", "kv_heads"), use_bias=c.qkv_bias, **dense
        )
        self.o_proj = Linear(
            q_width, c.hidden_size, axes=("q_heads", "embed"), use_bias=c.o_bias, **dense
        )
        norm = {"eps": c.rms_norm_eps, "plus_one": c.gemma_norms, "param_dtype": param_dtype}
        self.q_norm = RMSNorm(c.head_dim, **norm) if c.qk_norm else None
        self.k_norm = RMSNorm(c.head_dim, **norm) if c.qk_norm else None

    def __call__(
        self,
        x_BxTxD: jax.Array,
        positions_BxT: jax.Array,
        segment_ids_BxT: jax.Array,
        dropout_key: jax.Array | None = None,
    ):
        q_BxTxKxGxE, k_BxSxKxE, v_BxSxKxE = self._project(x_BxTxD, positions_BxT, dropout_key)
        if self.kind == "splash":
            out_BxTxHE = splash_attention(q_BxTxKxGxE, k_BxSxKxE, v_BxSxKxE, segment_ids_BxT,
                                          self.scale, self.window, self.softcap)  # fmt: skip
            return self.o_proj(out_BxTxHE, _fold(dropout_key, 3))
        if self.kind == "cudnn" and self.max_segments and packed_cudnn_supported():
            out_BxTxHE = cudnn_packed_attention(
                q_BxTxKxGxE, k_BxSxKxE, v_BxSxKxE, segment_ids_BxT, self.scale, self.window,
                self.max_segments,
            )  # fmt: skip
            return self.o_proj(out_BxTxHE, _fold(dropout_key, 3))
        mask_BxTxS = attention_mask(segment_ids_BxT, positions_BxT, self.window)
        if self.kind == "cudnn":
            out_BxTxHE = fused_attention(q_BxTxKxGxE, k_BxSxKxE, v_BxSxKxE, mask_BxTxS,
                                         self.scale, self.window)  # fmt: skip
            return self.o_proj(out_BxTxHE, _fold(dropout_key, 3))
        return self._attend(q_BxTxKxGxE, k_BxSxKxE, v_BxSxKxE, mask_BxTxS, _fold(dropout_key, 3))

    def extend(
        self,
        x_BxTxD: jax.Array,
        positions_BxT: jax.Array,
        keys_BxSxKxE: jax.Array,
        values_BxSxKxE: jax.Array,
        key_positions_BxS: jax.Array,
        index: jax.Array,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Writes the T new keys/values at slot `index`, attends over the cache (positions of
        every slot, new ones included, in key_positions_BxS); returns output and cache."""
        q_BxTxKxGxE, k_BxTxKxE, v_BxTxKxE = self._project(x_BxTxD, positions_BxT, None)
        keys_BxSxKxE = _write(keys_BxSxKxE, k_BxTxKxE, index)
        values_BxSxKxE = _write(values_BxSxKxE, v_BxTxKxE, index)
        mask_BxTxS = cache_mask(positions_BxT, key_positions_BxS, self.window)
        out_BxTxD = self._attend(q_BxTxKxGxE, keys_BxSxKxE, values_BxSxKxE, mask_BxTxS, None)
        return out_BxTxD, keys_BxSxKxE, values_BxSxKxE

    def _project(
        self, x_BxTxD: jax.Array, positions_BxT: jax.Array, dropout_key: jax.Array | None
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Queries [B, T, K, G, E] and keys, values [B, T, K, E], normed and rotated."""
        batch, seq_len, _ = x_BxTxD.shape
        groups = self.num_heads // self.num_kv_heads
        q_BxTxHxE = self.q_proj(x_BxTxD, _fold(dropout_key, 0))
        k_BxSxKxE = self.k_proj(x_BxTxD, _fold(dropout_key, 1))
        v_BxSxKxE = self.v_proj(x_BxTxD, _fold(dropout_key, 2))
        q_BxTxHxE = q_BxTxHxE.reshape(batch, seq_len, self.num_heads, self.head_dim)
        k_BxSxKxE = k_BxSxKxE.reshape(batch, seq_len, self.num_kv_heads, self.head_dim)
        v_BxSxKxE = v_BxSxKxE.reshape(batch, seq_len, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q_BxTxHxE, k_BxSxKxE = self.q_norm(q_BxTxHxE), self.k_norm(k_BxSxKxE)
        q_BxTxHxE = apply_rope(q_BxTxHxE, positions_BxT, self.rope)
        k_BxSxKxE = apply_rope(k_BxSxKxE, positions_BxT, self.rope)
        q_BxTxKxGxE = q_BxTxHxE.reshape(batch, seq_len, self.num_kv_heads, groups, self.head_dim)
        return q_BxTxKxGxE, k_BxSxKxE, v_BxSxKxE

    def _attend(
        self,
        q_BxTxKxGxE: jax.Array,
        k_BxSxKxE: jax.Array,
        v_BxSxKxE: jax.Array,
        mask_BxTxS: jax.Array,
        dropout_key: jax.Array | None,
    ) -> jax.Array:
        batch, seq_len = q_BxTxKxGxE.shape[:2]
        scores = einsum_f32("BTKGE,BSKE->BKGTS", q_BxTxKxGxE, k_BxSxKxE)
        scores = scores * self.scale
        if self.softcap is not None:
            scores = jnp.tanh(scores / self.softcap) * self.softcap
        scores = jnp.where(mask_BxTxS[:, None, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v_BxSxKxE.dtype)
        out_BxTxKxGxE = jnp.einsum("BKGTS,BSKE->BTKGE", probs, v_BxSxKxE)
        out_BxTxHE = out_BxTxKxGxE.reshape(batch, seq_len, self.num_heads * self.head_dim)
        return self.o_proj(out_BxTxHE, dropout_key)


class MLP(nnx.Module):
    """Gated MLP: down(act(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig, *, dtype, param_dtype, rngs):
        c = config
        dense = {"use_bias": c.mlp_bias, "dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        self.gate_proj = Linear(c.hidden_size, c.intermediate_size, axes=("embed", "mlp"), **dense)
        self.up_proj = Linear(c.hidden_size, c.intermediate_size, axes=("embed", "mlp"), **dense)
        self.down_proj = Linear(c.intermediate_size, c.hidden_size, axes=("mlp", "embed"), **dense)
        self.gelu = c.activation == "gelu_pytorch_tanh"

    def __call__(self, x_BxTxD: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
        gate_BxTxF = self.gate_proj(x_BxTxD, _fold(dropout_key, 0))
        activated = (
            jax.nn.gelu(gate_BxTxF, approximate=True) if self.gelu else jax.nn.silu(gate_BxTxF)
        )
        hidden_BxTxF = activated * self.up_proj(x_BxTxD, _fold(dropout_key, 1))
        return self.down_proj(hidden_BxTxF, _fold(dropout_key, 2))


class DecoderLayer(nnx.Module):
    """Pre-norm residual block; Gemma adds norms on the attention and MLP outputs."""

    def __init__(self, config: ModelConfig, layer_index: int, *, dtype, param_dtype, rngs):
        c = config
        norm = {"eps": c.rms_norm_eps, "plus_one": c.gemma_norms, "param_dtype": param_dtype}
        self.attn_norm = RMSNorm(c.hidden_size, **norm)
        self.attn = Attention(c, layer_index, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.attn_post_norm = RMSNorm(c.hidden_size, **norm) if c.sandwich_norms else None
        self.mlp_norm = RMSNorm(c.hidden_size, **norm)
        self.mlp = MLP(c, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.mlp_post_norm = RMSNorm(c.hidden_size, **norm) if c.sandwich_norms else None

    def __call__(
        self,
        x_BxTxD: jax.Array,
        positions_BxT: jax.Array,
        segment_ids_BxT: jax.Array,
        dropout_key: jax.Array | None = None,
    ):
        normed = self.attn_norm(x_BxTxD)
        attn_out = self.attn(normed, positions_BxT, segment_ids_BxT, _fold(dropout_key, 0))
        return self._add_attention_and_mlp(x_BxTxD, attn_out, _fold(dropout_key, 1))

    def extend(
        self,
        x_BxTxD: jax.Array,
        positions_BxT: jax.Array,
        keys_BxSxKxE: jax.Array,
        values_BxSxKxE: jax.Array,
        key_positions_BxS: jax.Array,
        index: jax.Array,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """The layer on T new tokens against its cache (see Attention.extend)."""
        attn_out, keys_BxSxKxE, values_BxSxKxE = self.attn.extend(
            self.attn_norm(x_BxTxD), positions_BxT, keys_BxSxKxE, values_BxSxKxE,
            key_positions_BxS, index,
        )  # fmt: skip
        return self._add_attention_and_mlp(x_BxTxD, attn_out, None), keys_BxSxKxE, values_BxSxKxE

    def _add_attention_and_mlp(
        self, x_BxTxD: jax.Array, attn_out: jax.Array, dropout_key: jax.Array | None
    ) -> jax.Array:
        if self.attn_post_norm is not None:
            attn_out = self.attn_post_norm(attn_out)
        x_BxTxD = x_BxTxD + attn_out
        mlp_out = self.mlp(self.mlp_norm(x_BxTxD), dropout_key)
        if self.mlp_post_norm is not None:
            mlp_out = self.mlp_post_norm(mlp_out)
        return x_BxTxD + mlp_out


def use_attention(model: CausalLM, kind: str) -> None:
    """Switches the attention kernel of every layer (the parameters stay as they are)."""
    if kind not in ATTENTION_KINDS:
        raise ValueError(f"attention={kind!r}: expected one of {ATTENTION_KINDS}.")
    model.config = dataclasses.replace(model.config, attention=kind)
    for layer in model.layers:
        layer.attn.kind = kind


def head_logits(hidden_BxTxD: jax.Array, head_VxD: jax.Array, softcap: float | None) -> jax.Array:
    """float32 logits [..., V] from hidden states and an LM head (or a slice of its rows), the
    head cast to the hidden states' (compute) dtype here: callers that loop over chunks hold it
    in the parameter dtype, so that its gradient adds up in that dtype."""
    logits = einsum_f32("...D,VD->...V", hidden_BxTxD, head_VxD.astype(hidden_BxTxD.dtype))
    if softcap is not None:
        logits = jnp.tanh(logits / softcap) * softcap
    return logits


def _call_layer(layer: DecoderLayer, x_BxTxD, positions_BxT, segment_ids_BxT, key) -> jax.Array:
    return layer(x_BxTxD, positions_BxT, segment_ids_BxT, key)


class CausalLM(nnx.Module):
    """Decoder-only language model: embed, N decoder layers, final norm, LM head."""

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
            _normal(rngs, (c.vocab_size, c.hidden_size), param_dtype),
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
        self.lm_head = (
            None
            if c.tie_word_embeddings
            else nnx.Param(
                _normal(rngs, (c.vocab_size, c.hidden_size), param_dtype),
                logical_axes=("vocab", "embed"),
            )
        )

    def hidden_states(
        self,
        input_ids_BxT: jax.Array,
        positions_BxT: jax.Array,
        segment_ids_BxT: jax.Array,
        dropout_key: jax.Array | None = None,
    ) -> jax.Array:
        """Final-normed hidden states [B, T, D] in the compute dtype.

        dropout_key enables LoRA dropout (training); None means deterministic.
        """
        x_BxTxD = self._embed(input_ids_BxT)
        apply_layer = _call_layer
        if self.remat != "none":
            apply_layer = nnx.remat(_call_layer, policy=REMAT_POLICIES[self.remat])
        for index, layer in enumerate(self.layers):
            key = _fold(dropout_key, index)
            x_BxTxD = apply_layer(layer, x_BxTxD, positions_BxT, segment_ids_BxT, key)
        return self.final_norm(x_BxTxD)

    def extend(
        self, input_ids_BxT: jax.Array, positions_BxT: jax.Array, cache: KVCache
    ) -> tuple[jax.Array, KVCache]:
        """Final-normed hidden states [B, T, D] of T new tokens, which attend to the cache and
        are written to it at slots [cache.index, cache.index + T); positions < 0 mark padding."""
        key_positions_BxS = _write(cache.positions_BxS, positions_BxT, cache.index)
        x_BxTxD = self._embed(input_ids_BxT)
        keys, values = [], []
        for layer, layer_keys, layer_values in zip(
            self.layers, cache.keys, cache.values, strict=True
        ):
            x_BxTxD, layer_keys, layer_values = layer.extend(
                x_BxTxD, positions_BxT, layer_keys, layer_values, key_positions_BxS, cache.index
            )
            keys.append(layer_keys)
            values.append(layer_values)
        new_index = cache.index + input_ids_BxT.shape[1]
        return self.final_norm(x_BxTxD), KVCache(
            tuple(keys), tuple(values), key_positions_BxS, new_index
        )

    def _embed(self, input_ids_BxT: jax.Array) -> jax.Array:
        embed_VxD = self.embed[...]
        x_BxTxD = jnp.take(embed_VxD, input_ids_BxT, axis=0)
        if self.config.embed_scale:
            # transformers rounds sqrt(D) to the weight dtype before multiplying.
            x_BxTxD = x_BxTxD * jnp.asarray(np.sqrt(self.config.hidden_size), embed_VxD.dtype)
        return x_BxTxD.astype(self.dtype)

    def head(self) -> jax.Array:
        """The LM head [V, D] in the parameter dtype (the embedding where they are tied)."""
        return self.embed[...] if self.lm_head is None else self.lm_head[...]

    def logits(self, hidden_BxTxD: jax.Array) -> jax.Array:
        """float32 logits [..., V] of (a chunk of) hidden states, soft-capped where configured."""
        return head_logits(hidden_BxTxD, self.head(), self.config.final_logit_softcap)

    def __call__(
        self, input_ids_BxT: jax.Array, positions_BxT: jax.Array, segment_ids_BxT: jax.Array
    ) -> jax.Array:
        return self.logits(self.hidden_states(input_ids_BxT, positions_BxT, segment_ids_BxT))
