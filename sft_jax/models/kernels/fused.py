"""Fused attention kernels: cuDNN (NVIDIA GPUs, through jax) and Pallas splash (TPUs).

Each takes queries [B, T, K, G, E], keys and values [B, S, K, E] and keeps packed documents
apart (segment ids, or the segment table of cuDNN's packed layout); under a mesh each runs per
shard (models/partitioning.py). The einsum path in attention.py is their reference.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from sft_jax.models.config import UnsupportedModelError
from sft_jax.models.partitioning import attention_per_shard

# None here: jax's own XLA path, to check our layout and masks on CPU).
FUSED_IMPLEMENTATION = {"cudnn": "cudnn"}
# cuDNN's attention with a packed layout (a table of segments per row), jax's own binding of
# it; tests put an emulation of the kernel's contract here to check our table on CPU.
PACKED_KERNEL = {"fn": None}
# Run the splash kernel in the Pallas interpreter (tests on CPU; far too slow for training).
SPLASH_INTERPRET = {"interpret": False}
ATTENTION_KINDS = ("xla", "cudnn", "splash", "blockwise")  # blockwise: models/blockwise.py
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
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    with jax.ensure_compile_time_eval():  # the mask tables are constants, even mid-trace
        return splash.make_splash_mqa_single_device(
            masks.MultiHeadMask([head_mask] * groups),
            block_sizes=sizes,
            attn_logits_soft_cap=softcap,
            interpret=interpret,
        )


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

    out_BxTxKxGxE = attention_per_shard(local, q_BxTxKxGxE, k_BxSxKxE, v_BxSxKxE, segment_ids_BxT)
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
            q_BxTxKxGxE.reshape(rows, seq_len, -1, head_dim),
            k_BxSxKxE,
            v_BxSxKxE,
            q_seqlen=lengths_BxM,
            kv_seqlen=lengths_BxM,
            q_offsets=starts_BxM1,
            kv_offsets=starts_BxM1,
            scale=scale,
            sliding_window_length=window,
        )
        out_BxTxHxE = jnp.where(fits_B[:, None, None, None], out_BxTxHxE, jnp.nan)
        return out_BxTxHxE.reshape(q_BxTxKxGxE.shape)

    out_BxTxKxGxE = attention_per_shard(local, q_BxTxKxGxE, k_BxSxKxE, v_BxSxKxE, segment_ids_BxT)
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
    out_BxTxKxGxE = _cudnn(
        q_BxTxKxGxE,
        k_BxSxKxE,
        v_BxSxKxE,
        mask_BxTxS,
        scale,
        is_causal=True,
        local_window_size=None if window is None else (window - 1, 0),
    )
    batch, seq_len = q_BxTxKxGxE.shape[:2]
    return out_BxTxKxGxE.reshape(batch, seq_len, -1)


def masked_attention(
    q_BxTxKxGxE: jax.Array,
    k_BxSxKxE: jax.Array,
    v_BxSxKxE: jax.Array,
    mask_BxTxS: jax.Array,
    scale: float,
) -> jax.Array:
    """jax.nn.dot_product_attention (cuDNN) under an arbitrary mask alone, no causal tiles:
    for queries that are not in sequence order (one context shard's). Output [B, T, K, G, E]."""
    return _cudnn(q_BxTxKxGxE, k_BxSxKxE, v_BxSxKxE, mask_BxTxS, scale)


def _cudnn(
    q_BxTxKxGxE: jax.Array,
    k_BxSxKxE: jax.Array,
    v_BxSxKxE: jax.Array,
    mask_BxTxS: jax.Array,
    scale: float,
    **tiles: Any,
) -> jax.Array:
    """jax.nn.dot_product_attention (cuDNN) with query head h = k * G + g reading key/value
    head k; tiles: is_causal, local_window_size (so cuDNN skips the tiles they rule out).
    Output [B, T, K, G, E]."""
    batch, seq_len, kv_heads, groups, head_dim = q_BxTxKxGxE.shape
    q_BxTxHxE = q_BxTxKxGxE.reshape(batch, seq_len, kv_heads * groups, head_dim)
    out_BxTxHxE = jax.nn.dot_product_attention(
        q_BxTxHxE,
        k_BxSxKxE,
        v_BxSxKxE,
        mask=mask_BxTxS[:, None],
        scale=scale,
        implementation=FUSED_IMPLEMENTATION["cudnn"],
        **tiles,
    )
    return out_BxTxHxE.reshape(q_BxTxKxGxE.shape)
