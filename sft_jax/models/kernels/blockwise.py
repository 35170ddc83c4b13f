"""Blockwise (flash-style) attention in plain JAX: online softmax over key blocks, on any backend.

Dimension legend as in attention.py: B batch, T query time, S key time, K key/value heads, G
query heads per key/value head, E head dim; N blocks, Q / C tokens of a query / key block.

The forward pass walks query blocks and, inside each, key blocks, keeping a running maximum,
sum and weighted value sum (the online softmax), so no [T, S] score matrix ever exists. Its
custom VJP saves only q, k, v, the output and the log-sum-exp of each query, and recomputes
each block's scores in the backward pass. Peak memory is then that of cuDNN's or splash's flash
attention, which is why the planner (sft_jax.planning.search) compiles it in their place on CPU.

The mask is the einsum path's: same segment (padding, id 0, is a segment of its own), causal,
and in sliding-window layers less than `window` tokens back. Distance is counted in tokens of
the row, as the splash kernel does: inside a packed document it equals the position distance.
Tokens need not come in order: with the sequence split over mesh.context, each shard's
queries (two chunks of the row) run against the gathered keys, each token placed by its index
in the row (flash_attention, called by models/attention.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from sft_jax.models.partitioning import attention_per_shard

# Tokens per query block and per key block; a row is padded up to a multiple of it.
BLOCK = {"tokens": 512}
_LOWEST = jnp.finfo(jnp.float32).min


def _blocks(x_BxTx: jax.Array, block: int) -> jax.Array:
    """[B, T, ...] -> [N, B, block, ...]: the blocks along time, first."""
    batch, seq_len = x_BxTx.shape[:2]
    x_BxNxQx = x_BxTx.reshape(batch, seq_len // block, block, *x_BxTx.shape[2:])
    return jnp.moveaxis(x_BxNxQx, 1, 0)


def _unblocks(x_NxBxQx: jax.Array) -> jax.Array:
    x_BxNxQx = jnp.moveaxis(x_NxBxQx, 0, 1)
    return x_BxNxQx.reshape(x_BxNxQx.shape[0], -1, *x_BxNxQx.shape[3:])


def _scores(q_BxQxKxGxE, k_BxCxKxE, queries, keys, scale, window, softcap):
    """(scores [B, K, G, Q, C] in float32, scaled and soft-capped; mask [B, 1, 1, Q, C]).
    `queries` and `keys` are (segment ids [B, Q|C], token index [Q|C]) of the two blocks."""
    (segment_q, index_q), (segment_k, index_k) = queries, keys
    scores = jnp.einsum(
        "BQKGE,BCKE->BKGQC", q_BxQxKxGxE, k_BxCxKxE, preferred_element_type=jnp.float32
    )
    scores = scores * scale
    if softcap is not None:
        scores = jnp.tanh(scores / softcap) * softcap
    distance_QxC = index_q[:, None] - index_k[None, :]
    mask_QxC = distance_QxC >= 0
    if window is not None:
        mask_QxC = mask_QxC & (distance_QxC < window)
    mask_BxQxC = (segment_q[:, :, None] == segment_k[:, None, :]) & mask_QxC[None]
    return scores, mask_BxQxC[:, None, None]


def _reaches(index_q: jax.Array, index_k: jax.Array, window: int | None) -> jax.Array:
    """Whether any query of the block may see any key of the block (else the block is skipped).
    Tokens may come in any order (context shards hold two chunks each): their extremes decide."""
    causal = index_k.min() <= index_q.max()
    if window is None:
        return causal
    return causal & (index_q.min() - index_k.max() < window)


def _forward(q, k, v, tokens, scale, window, softcap, block):
    """(output [B, T, K, G, E], log-sum-exp [B, K, G, T] in float32). `tokens`: the segment ids
    of queries [B, T] and keys [B, S], and the index in the row of each query [T] and key [S]."""
    segment_q_BxT, segment_k_BxS, index_T, index_S = tokens
    batch, seq_len, kv_heads, groups, _ = q.shape
    keys = (
        _blocks(k, block),
        _blocks(v, block),
        _blocks(segment_k_BxS, block),
        index_S.reshape(-1, block),
    )

    def query_block(args):
        q_BxQxKxGxE, segment_q, index_q = args

        def key_block(carry, args):
            k_BxCxKxE, v_BxCxKxE, segment_k, index_k = args

            def update(carry):
                max_BxKxGxQ, sum_BxKxGxQ, acc_BxKxGxQxE = carry
                scores, mask = _scores(
                    q_BxQxKxGxE,
                    k_BxCxKxE,
                    (segment_q, index_q),
                    (segment_k, index_k),
                    scale,
                    window,
                    softcap,
                )
                new_max = jnp.maximum(max_BxKxGxQ, jnp.where(mask, scores, _LOWEST).max(-1))
                probs = jnp.where(mask, jnp.exp(scores - new_max[..., None]), 0.0)
                rescale = jnp.exp(max_BxKxGxQ - new_max)
                acc_BxKxGxQxE = acc_BxKxGxQxE * rescale[..., None] + jnp.einsum(
                    "BKGQC,BCKE->BKGQE",
                    probs.astype(v_BxCxKxE.dtype),
                    v_BxCxKxE,
                    preferred_element_type=jnp.float32,
                )
                return new_max, sum_BxKxGxQ * rescale + probs.sum(-1), acc_BxKxGxQxE

            reached = _reaches(index_q, index_k, window)
            return jax.lax.cond(reached, update, lambda c: c, carry), None

        shape = (batch, kv_heads, groups, block)
        init = (jnp.full(shape, _LOWEST), jnp.zeros(shape), jnp.zeros((*shape, q.shape[-1])))
        (max_, sum_, acc), _ = jax.lax.scan(key_block, init, keys)
        # Every real query sees itself; a padding query may see nothing: output 0, not 0 / 0.
        sum_ = jnp.where(sum_ > 0, sum_, 1.0)
        out_BxKxGxQxE = acc / sum_[..., None]
        return jnp.moveaxis(out_BxKxGxQxE, 3, 1).astype(q.dtype), max_ + jnp.log(sum_)

    queries = (_blocks(q, block), _blocks(segment_q_BxT, block), index_T.reshape(-1, block))
    out_NxBxQxKxGxE, lse_NxBxKxGxQ = jax.lax.map(query_block, queries)
    lse_BxKxGxT = jnp.moveaxis(lse_NxBxKxGxQ, 0, 3).reshape(batch, kv_heads, groups, seq_len)
    return _unblocks(out_NxBxQxKxGxE), lse_BxKxGxT


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _attention(q, k, v, tokens, scale, window, softcap, block):
    """(output, log-sum-exp): both differentiable (the sinks of with_sinks scale by lse)."""
    return _forward(q, k, v, tokens, scale, window, softcap, block)


def _attention_fwd(q, k, v, tokens, scale, window, softcap, block):
    out, lse = _forward(q, k, v, tokens, scale, window, softcap, block)
    return (out, lse), (q, k, v, tokens, out, lse)


def _score_grads(q_BxQxKxGxE, blocks_q, blocks_k, scale, window, softcap):
    """(probabilities, score cotangents) [B, K, G, Q, C] of one query block x key block;
    blocks_q: (segment ids, index, log-sum-exp, output cotangent, delta) of the query block."""
    segment_q, index_q, lse_BxKxGxQ, dout, delta_BxKxGxQ = blocks_q
    k_BxCxKxE, v_BxCxKxE, segment_k, index_k = blocks_k
    scores, mask = _scores(
        q_BxQxKxGxE, k_BxCxKxE, (segment_q, index_q), (segment_k, index_k), scale, window, softcap
    )
    probs = jnp.where(mask, jnp.exp(scores - lse_BxKxGxQ[..., None]), 0.0)
    dprobs = jnp.einsum("BQKGE,BCKE->BKGQC", dout, v_BxCxKxE, preferred_element_type=jnp.float32)
    dscores = probs * (dprobs - delta_BxKxGxQ[..., None])
    if softcap is not None:  # d(c tanh(x / c)) / dx = 1 - tanh^2
        dscores = dscores * (1.0 - jnp.square(scores / softcap))
    return probs, dscores * scale


def _attention_bwd(scale, window, softcap, block, residuals, cotangents):
    q, k, v, tokens, out, lse_BxKxGxT = residuals
    dout_BxTxKxGxE, dlse_BxKxGxT = cotangents
    segment_q_BxT, segment_k_BxS, index_T, index_S = tokens
    delta_BxTxKxG = jnp.sum(dout_BxTxKxGxE.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
    # d lse / d score = its probability: a cotangent of lse adds to each score's dP - delta.
    delta_BxTxKxG = delta_BxTxKxG - jnp.moveaxis(dlse_BxKxGxT, 3, 1)
    lse_NxBxKxGxQ = jnp.moveaxis(lse_BxKxGxT.reshape(*lse_BxKxGxT.shape[:3], -1, block), 3, 0)
    delta_NxBxKxGxQ = jnp.moveaxis(_blocks(delta_BxTxKxG, block), 2, -1)
    per_query = (
        _blocks(q, block),
        _blocks(segment_q_BxT, block),
        index_T.reshape(-1, block),
        lse_NxBxKxGxQ,
        _blocks(dout_BxTxKxGxE, block),
        delta_NxBxKxGxQ,
    )
    per_key = (
        _blocks(k, block),
        _blocks(v, block),
        _blocks(segment_k_BxS, block),
        index_S.reshape(-1, block),
    )
    grads = functools.partial(_score_grads, scale=scale, window=window, softcap=softcap)

    dquery = functools.partial(_dquery_block, grads, per_key, window, q.dtype)
    dkey = functools.partial(_dkey_block, grads, per_query, window, (q.dtype, k.dtype, v.dtype))
    dq = _unblocks(jax.lax.map(dquery, per_query))
    dk_NxBxCxKxE, dv_NxBxCxKxE = jax.lax.map(dkey, per_key)
    return dq, _unblocks(dk_NxBxCxKxE), _unblocks(dv_NxBxCxKxE), None


def _dquery_block(grads, per_key, window, dtype, args):
    """dq of one query block (args: its per-query blocks): a sum over the key blocks it reaches."""
    q_i, index_q = args[0], args[2]

    def key_block(dq_BxQxKxGxE, blocks_k):
        def add(dq):
            _, dscores = grads(q_i, args[1:], blocks_k)
            return dq + jnp.einsum(
                "BKGQC,BCKE->BQKGE",
                dscores.astype(dtype),
                blocks_k[0],
                preferred_element_type=jnp.float32,
            )

        reached = _reaches(index_q, blocks_k[3], window)
        return jax.lax.cond(reached, add, lambda dq: dq, dq_BxQxKxGxE), None

    dq, _ = jax.lax.scan(key_block, jnp.zeros(q_i.shape, jnp.float32), per_key)
    return dq.astype(dtype)


def _dkey_block(grads, per_query, window, dtypes, blocks_k):
    """dk, dv of one key block: sums over the query blocks that reach it. dtypes: q, k, v's."""
    q_dtype, k_dtype, v_dtype = dtypes

    def query_block(carry, args):
        def add(carry):
            dk, dv = carry
            probs, dscores = grads(args[0], args[1:], blocks_k)
            dk = dk + jnp.einsum(
                "BKGQC,BQKGE->BCKE",
                dscores.astype(q_dtype),
                args[0],
                preferred_element_type=jnp.float32,
            )
            dv = dv + jnp.einsum(
                "BKGQC,BQKGE->BCKE",
                probs.astype(v_dtype),
                args[4],
                preferred_element_type=jnp.float32,
            )
            return dk, dv

        reached = _reaches(args[2], blocks_k[3], window)
        return jax.lax.cond(reached, add, lambda c: c, carry), None

    zeros = jnp.zeros(blocks_k[0].shape, jnp.float32)
    (dk, dv), _ = jax.lax.scan(query_block, (zeros, zeros), per_query)
    return dk.astype(k_dtype), dv.astype(v_dtype)


_attention.defvjp(_attention_fwd, _attention_bwd)


def flash_attention(
    q_BxTxKxGxE: jax.Array,
    k_BxSxKxE: jax.Array,
    v_BxSxKxE: jax.Array,
    segment_ids: tuple[jax.Array, jax.Array],
    index: tuple[jax.Array, jax.Array],
    scale: float,
    window: int | None,
    softcap: float | None,
    sinks_KxG: jax.Array | None = None,
) -> jax.Array:
    """Output [B, T, K, G, E] of T queries against S keys, on one device: `segment_ids` of the
    queries [B, T] and keys [B, S]; `index`, each token's place in the row, of the queries [T]
    and keys [S] (in any order; causality and the window are counted in it). Queries and keys
    are padded to a multiple of the block with a segment of their own (id -1), placed after
    every real token, and cut off again after. With sinks (a logit per head in the softmax's
    denominator, attending to nothing) the output is scaled by exp(lse) / (exp(lse) +
    exp(sink)) = sigmoid(lse - sink), lse the log-sum-exp of the query's scores."""
    seq_len, keys_len = q_BxTxKxGxE.shape[1], k_BxSxKxE.shape[1]
    block = min(BLOCK["tokens"], seq_len)

    def widen(x, length, value=0):
        pad = [(0, 0), (0, -length % block)] + [(0, 0)] * (x.ndim - 2)
        return jnp.pad(x, pad, constant_values=value)

    def widen_index(index_T, length):
        after = keys_len + jnp.arange(-length % block, dtype=index_T.dtype)
        return jnp.concatenate([index_T, after])

    tokens = (
        widen(segment_ids[0], seq_len, -1),
        widen(segment_ids[1], keys_len, -1),
        widen_index(index[0], seq_len),
        widen_index(index[1], keys_len),
    )
    q, k, v = widen(q_BxTxKxGxE, seq_len), widen(k_BxSxKxE, keys_len), widen(v_BxSxKxE, keys_len)
    out_BxTxKxGxE, lse_BxKxGxT = _attention(q, k, v, tokens, scale, window, softcap, block)
    if sinks_KxG is not None:
        kept_BxKxGxT = jax.nn.sigmoid(lse_BxKxGxT - sinks_KxG.astype(jnp.float32)[None, :, :, None])
        kept_BxTxKxG = jnp.moveaxis(kept_BxKxGxT, 3, 1).astype(out_BxTxKxGxE.dtype)
        out_BxTxKxGxE = out_BxTxKxGxE * kept_BxTxKxG[..., None]
    return out_BxTxKxGxE[:, :seq_len]


def blockwise_attention(
    q_BxTxKxGxE: jax.Array,
    k_BxSxKxE: jax.Array,
    v_BxSxKxE: jax.Array,
    segment_ids_BxT: jax.Array,
    scale: float,
    window: int | None,
    softcap: float | None,
    sinks_KxG: jax.Array | None = None,
) -> jax.Array:
    """Causal attention over packed rows in sequence order, block by block: output
    [B, T, H * E], on each shard of the mesh (rows over the batch axes, heads over tensor);
    sinks [K, G] as flash_attention takes them."""
    batch, seq_len, kv_heads, groups, head_dim = q_BxTxKxGxE.shape

    def local(q_BxTxKxGxE, k_BxSxKxE, v_BxSxKxE, segment_ids_BxT, *sinks_KxG):
        index_T = jnp.arange(seq_len)
        return flash_attention(
            q_BxTxKxGxE,
            k_BxSxKxE,
            v_BxSxKxE,
            (segment_ids_BxT,) * 2,
            (index_T, index_T),
            scale,
            window,
            softcap,
            *sinks_KxG,
        )

    sinks = () if sinks_KxG is None else (sinks_KxG,)
    out_BxTxKxGxE = attention_per_shard(
        local, q_BxTxKxGxE, k_BxSxKxE, v_BxSxKxE, segment_ids_BxT, *sinks
    )
    return out_BxTxKxGxE.reshape(batch, seq_len, kv_heads * groups * head_dim)
