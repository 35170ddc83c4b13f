"""The gated delta rule (Gated DeltaNet's linear attention) in plain JAX: a chunked scan for
whole sequences, a token-by-token recurrence for decoding, and the causal depthwise
convolution in front of it. Packed documents never see each other: the state restarts and
the convolution's window is cut at every document start.

Dimension legend: B batch, T time, H value heads (queries and keys already repeated to H),
K key head dim, V value head dim, N chunks, C positions in a chunk (and I, J two of them),
W convolution width, P = W - 1 earlier inputs, X convolution channels.

Per token t of a document, with state S [K, V] (zero at the document's start):
    S = exp(g_t) * S;  S = S + k_t (beta_t * (v_t - S^T k_t))^T;  o_t = S^T q_t.
The chunked form computes C tokens at once (the UT transform of the DeltaNet paper): within
a chunk the delta-rule updates form a unit lower-triangular system, solved once per chunk;
the scan only carries S from chunk to chunk.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

CHUNK_SIZE = 64


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """x / sqrt(|x|^2 + eps) over the last axis (as the FLA kernels and transformers do)."""
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def document_starts(segment_ids_BxT: jax.Array) -> jax.Array:
    """[B, T] True where a token opens a document: the row's first token, or a segment id that
    differs from the previous token's (padding, segment 0, is one more document)."""
    previous_BxT = jnp.pad(segment_ids_BxT[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
    return segment_ids_BxT != previous_BxT


def segment_taps(segment_ids_BxT: jax.Array, width: int) -> jax.Array:
    """[B, T, W] True where the input j tokens back (tap j) lies in the token's own document."""
    taps = []
    for back in range(width):
        earlier_BxT = jnp.pad(segment_ids_BxT, ((0, 0), (back, 0)), constant_values=-1)
        taps.append(earlier_BxT[:, : segment_ids_BxT.shape[1]] == segment_ids_BxT)
    return jnp.stack(taps, axis=-1)


def position_taps(positions_BxT: jax.Array, width: int) -> jax.Array:
    """[B, T, W] the same from positions alone (generation: a document counts from 0 and
    padding has positions < 0): tap j is inside the document where position >= j."""
    return positions_BxT[:, :, None] >= jnp.arange(width)[None, None, :]


def causal_conv(
    x_BxTxX: jax.Array, weight_XxW: jax.Array, history_BxPxX: jax.Array, taps_BxTxW: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """(silu of the depthwise causal convolution [B, T, X], the last P inputs [B, P, X]).

    out_t = sum_j weight[:, W-1-j] * x_{t-j} over the taps j the token may see (PyTorch's
    conv1d with W-1 zeros of left padding, cut at document starts); history holds the P inputs
    before x (zeros at a sequence's start, the conv state when decoding)."""
    width = weight_XxW.shape[1]
    history = history_BxPxX.shape[1]
    seq_len = x_BxTxX.shape[1]
    inputs_BxSxX = jnp.concatenate([history_BxPxX.astype(x_BxTxX.dtype), x_BxTxX], axis=1)
    weight_XxW = weight_XxW.astype(x_BxTxX.dtype)
    out_BxTxX = jnp.zeros_like(x_BxTxX)
    for back in range(width):
        shifted_BxTxX = inputs_BxSxX[:, history - back : history - back + seq_len]
        tap_BxTx1 = taps_BxTxW[:, :, back, None].astype(x_BxTxX.dtype)
        out_BxTxX = (
            out_BxTxX + shifted_BxTxX * weight_XxW[None, None, :, width - 1 - back] * tap_BxTx1
        )
    return jax.nn.silu(out_BxTxX), inputs_BxSxX[:, seq_len:]


def recurrent_delta_rule(
    q_BxTxHxK: jax.Array,
    k_BxTxHxK: jax.Array,
    v_BxTxHxV: jax.Array,
    g_BxTxH: jax.Array,
    beta_BxTxH: jax.Array,
    starts_BxT: jax.Array,
    state_BxHxKxV: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """(outputs [B, T, H, V], final state) token by token, in float32 (the decoding form).
    q and k are normalized and q scaled by the caller; the state restarts where starts_BxT."""

    def step(state_BxHxKxV, token):
        q_BxHxK, k_BxHxK, v_BxHxV, g_BxH, beta_BxH, start_B = token
        state_BxHxKxV = jnp.where(start_B[:, None, None, None], 0.0, state_BxHxKxV)
        state_BxHxKxV = state_BxHxKxV * jnp.exp(g_BxH)[:, :, None, None]
        memory_BxHxV = jnp.einsum("BHKV,BHK->BHV", state_BxHxKxV, k_BxHxK)
        delta_BxHxV = (v_BxHxV - memory_BxHxV) * beta_BxH[:, :, None]
        state_BxHxKxV = state_BxHxKxV + jnp.einsum("BHK,BHV->BHKV", k_BxHxK, delta_BxHxV)
        return state_BxHxKxV, jnp.einsum("BHKV,BHK->BHV", state_BxHxKxV, q_BxHxK)

    tokens = (q_BxTxHxK, k_BxTxHxK, v_BxTxHxV, g_BxTxH, beta_BxTxH, starts_BxT)
    time_major = jax.tree.map(lambda x: jnp.moveaxis(x.astype(jnp.float32), 1, 0), tokens)
    time_major = (*time_major[:5], starts_BxT.T)
    state_BxHxKxV, out_TxBxHxV = jax.lax.scan(step, state_BxHxKxV.astype(jnp.float32), time_major)
    return jnp.moveaxis(out_TxBxHxV, 0, 1), state_BxHxKxV


def _chunked(x_BxTx: jax.Array, chunk: int) -> jax.Array:
    """[B, T, H, ...] -> [B, H, N, C, ...] (T a multiple of chunk)."""
    batch, seq_len = x_BxTx.shape[:2]
    x = x_BxTx.reshape(batch, seq_len // chunk, chunk, *x_BxTx.shape[2:])
    return jnp.moveaxis(x, 3, 1) if x.ndim > 3 else x


def chunked_delta_rule(
    q_BxTxHxK: jax.Array,
    k_BxTxHxK: jax.Array,
    v_BxTxHxV: jax.Array,
    g_BxTxH: jax.Array,
    beta_BxTxH: jax.Array,
    starts_BxT: jax.Array,
    state_BxHxKxV: jax.Array,
    chunk: int = CHUNK_SIZE,
) -> tuple[jax.Array, jax.Array]:
    """The same outputs and final state as recurrent_delta_rule, C tokens at a time."""
    seq_len = q_BxTxHxK.shape[1]
    pad = (-seq_len) % chunk
    # Padding tokens (k = 0, beta = 0, g = 0, no start) leave the state as it is.
    padded = [
        jnp.pad(x.astype(jnp.float32), [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        for x in (q_BxTxHxK, k_BxTxHxK, v_BxTxHxV, g_BxTxH, beta_BxTxH)
    ]
    q, k, v, g, beta = (_chunked(x, chunk) for x in padded)  # [B, H, N, C, ...]
    starts_BxNxC = _chunked(jnp.pad(starts_BxT, ((0, 0), (0, pad))), chunk)

    def step(state_BxHxKxV, xs):
        new_v, reads, intra, q_read, k_write, chunk_decay = xs
        corrected = new_v - jnp.einsum("BHCK,BHKV->BHCV", reads, state_BxHxKxV)
        out = jnp.einsum("BHCK,BHKV->BHCV", q_read, state_BxHxKxV)
        out = out + jnp.einsum("BHIJ,BHJV->BHIV", intra, corrected)
        state_BxHxKxV = state_BxHxKxV * chunk_decay[:, :, None, None]
        state_BxHxKxV = state_BxHxKxV + jnp.einsum("BHCK,BHCV->BHKV", k_write, corrected)
        return state_BxHxKxV, out

    xs = _chunk_terms(q, k, v, g, beta, starts_BxNxC)
    xs = jax.tree.map(lambda x: jnp.moveaxis(x, 2, 0), xs)  # chunks first, for the scan
    state_BxHxKxV, out_NxBxHxCxV = jax.lax.scan(step, state_BxHxKxV.astype(jnp.float32), xs)
    batch, heads = out_NxBxHxCxV.shape[1:3]
    out_BxTxHxV = jnp.moveaxis(out_NxBxHxCxV, 0, 2).reshape(batch, heads, -1, v.shape[-1])
    return jnp.moveaxis(out_BxTxHxV, 1, 2)[:, :seq_len], state_BxHxKxV


def _unit_lower_inverse(strict_lower: jax.Array) -> jax.Array:
    """(I + A)^-1 of strictly lower-triangular A [..., C, C] (C a power of two): with A^C = 0,
    it is sum_i (-A)^i = (I - A)(I + A^2)(I + A^4)...(I + A^(C/2)), log2(C) matmuls (a batched
    triangular solve runs row by row, slowly on CPUs)."""
    eye = jnp.eye(strict_lower.shape[-1], dtype=strict_lower.dtype)
    eye = eye.reshape((1,) * (strict_lower.ndim - 2) + eye.shape)
    power = -strict_lower
    inverse = eye + power
    for _ in range(int(np.log2(strict_lower.shape[-1])) - 1):
        power = jnp.einsum("...IJ,...JK->...IK", power, power)
        inverse = jnp.einsum("...IJ,...JK->...IK", inverse, eye + power)
    return inverse


def _chunk_terms(
    q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array, beta: jax.Array, starts: jax.Array
) -> tuple[jax.Array, ...]:
    """What each chunk needs from within itself ([B, H, N, ...]): the delta-rule values and the
    keys that read the incoming state (both through the UT system), the intra-chunk scores,
    the queries that read the incoming state, the keys that write the outgoing one, and the
    chunk's total decay of the state. Tokens of different documents never meet, and tokens
    after a document start inside the chunk neither read the incoming state nor (unless in
    the chunk's last document) write the outgoing one."""
    chunk = q.shape[3]
    # Documents within each chunk (0: the one the previous chunk ended in).
    doc_Bx1xNxC = jnp.cumsum(starts.astype(jnp.int32), axis=-1)[:, None]
    carries_Bx1xNxC = doc_Bx1xNxC == 0  # tokens that still read the incoming state
    same_Bx1xNxIxJ = doc_Bx1xNxC[..., :, None] == doc_Bx1xNxC[..., None, :]
    seen_Bx1xNxIxJ = same_Bx1xNxIxJ & jnp.tril(jnp.ones((1, 1, 1, chunk, chunk), bool))
    decay_BxHxNxC = jnp.cumsum(g, axis=-1)  # log decay from the chunk's start
    log_pair = decay_BxHxNxC[..., :, None] - decay_BxHxNxC[..., None, :]
    # Masked before exp: above the diagonal the exponent is positive and may overflow.
    pair_decay = jnp.where(seen_Bx1xNxIxJ, jnp.exp(jnp.where(seen_Bx1xNxIxJ, log_pair, 0.0)), 0.0)
    k_beta = k * beta[..., None]
    strict_IxJ = jnp.tril(jnp.ones((1, 1, 1, chunk, chunk), bool), -1)
    system = jnp.einsum("BHNIK,BHNJK->BHNIJ", k_beta, k) * pair_decay * strict_IxJ
    inverse = _unit_lower_inverse(system)
    decay_in = jnp.exp(decay_BxHxNxC) * carries_Bx1xNxC

    def solve(rhs: jax.Array) -> jax.Array:
        return jnp.einsum("BHNIJ,BHNJK->BHNIK", inverse, rhs)

    in_last_doc = doc_Bx1xNxC == doc_Bx1xNxC[..., -1:]
    to_end = jnp.exp(decay_BxHxNxC[..., -1:] - decay_BxHxNxC) * in_last_doc
    return (
        solve(v * beta[..., None]),
        solve(k_beta * decay_in[..., None]),
        jnp.einsum("BHNIK,BHNJK->BHNIJ", q, k) * pair_decay,
        q * decay_in[..., None],
        k * to_end[..., None],
        jnp.exp(decay_BxHxNxC[..., -1]) * carries_Bx1xNxC[..., -1],
    )
