"""Masked next-token cross-entropy, computed in time chunks so full logits never exist at once.

The batch already holds shifted targets (`target_ids`, built once in the data layer), so the
loss never shifts. It returns *sums* over target tokens; the caller divides once by the number
of target tokens in the whole global batch (all devices, all accumulation micro-batches).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from sft_jax.models.decoder import CausalLM


class LossSums(NamedTuple):
    """Sums over the target tokens of a batch."""

    nll: jax.Array  # sum of -log p(target)
    z: jax.Array  # sum of logsumexp(logits)^2, the z-loss term
    target_tokens: jax.Array  # number of target tokens


def time_chunk(seq_len: int, max_chunk: int) -> int:
    """The largest divisor of seq_len that is at most max_chunk."""
    return max(d for d in range(1, min(seq_len, max_chunk) + 1) if seq_len % d == 0)


def _chunk_sums(
    model: CausalLM, hidden_BxCxD: jax.Array, targets_BxC: jax.Array, mask_BxC: jax.Array
) -> LossSums:
    logits_BxCxV = model.logits(hidden_BxCxD)  # float32
    log_normalizer_BxC = jax.nn.logsumexp(logits_BxCxV, axis=-1)
    target_logit_BxC = jnp.take_along_axis(logits_BxCxV, targets_BxC[..., None], axis=-1)[..., 0]
    weights = mask_BxC.astype(jnp.float32)
    return LossSums(
        nll=jnp.sum((log_normalizer_BxC - target_logit_BxC) * weights),
        z=jnp.sum(jnp.square(log_normalizer_BxC) * weights),
        target_tokens=jnp.sum(weights),
    )


def loss_sums(
    model: CausalLM,
    batch: dict[str, jax.Array],
    max_chunk: int = 512,
    dropout_key: jax.Array | None = None,
) -> LossSums:
    """Sums of the masked cross-entropy of `batch` under `model`.

    Logits are computed `chunk` time steps at a time (the batch axis stays whole, so it stays
    sharded) and recomputed in the backward pass: peak logits memory is [B, chunk, V].
    """
    hidden_BxTxD = model.hidden_states(
        batch["input_ids"], batch["positions"], batch["segment_ids"], dropout_key
    )
    batch_size, seq_len, _ = hidden_BxTxD.shape
    chunk = time_chunk(seq_len, max_chunk)
    num_chunks = seq_len // chunk

    def to_chunks(x: jax.Array) -> jax.Array:  # [B, T, ...] -> [T/C, B, C, ...]
        return jnp.swapaxes(x.reshape(batch_size, num_chunks, chunk, *x.shape[2:]), 0, 1)

    chunk_sums = jax.checkpoint(lambda h, t, m: _chunk_sums(model, h, t, m))

    def accumulate(total: LossSums, xs: tuple[jax.Array, ...]) -> tuple[LossSums, None]:
        sums = chunk_sums(*xs)
        return LossSums(*(a + b for a, b in zip(total, sums, strict=True))), None

    zero = jnp.zeros((), jnp.float32)
    chunks = (
        to_chunks(hidden_BxTxD),
        to_chunks(batch["target_ids"]),
        to_chunks(batch["target_mask"]),
    )
    total, _ = jax.lax.scan(accumulate, LossSums(zero, zero, zero), chunks)
    return total
