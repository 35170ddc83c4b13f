"""Per-token log-probs and greedy flags of token sequences, batched into a few compiled shapes.

A scored sequence is the model's input (all tokens but the last) and its targets (all but the
first), right-padded to a bucket length; only each row's last `scored` targets count. Example
(lm-eval's loglikelihood, context [c1 c2], continuation [x1 x2], T = 4):
  input_ids  = [c1 c2 x1 pad]
  target_ids = [c2 x1 x2 pad]
  scored     = 2   ->  log p(x1 | c1 c2) + log p(x2 | c1 c2 x1)
Rows are sorted by length and cut into batches of `batch_size` rows (the last one padded with
empty rows), each padded to the smallest power of two >= its longest row (at least 16), so a
task compiles one program per length bucket.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sft_jax.generation.sampler import bucket
from sft_jax.models.decoder import CausalLM
from sft_jax.models.io.hf import to_host
from sft_jax.objectives.loss import time_chunk

_MIN_LENGTH_BUCKET = 16
_MAX_CHUNK = 256  # time steps whose logits [B, chunk, V] exist at once


@dataclasses.dataclass(frozen=True)
class Scored:
    """Of one sequence: the summed log-prob of its scored targets, and whether each of them
    is the model's argmax (lm-eval's (loglikelihood, is_greedy))."""

    logprob: float
    is_greedy: bool


def _chunk_scores(
    model: CausalLM, hidden_BxCxD: jax.Array, targets_BxC: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """float32 log p(target) [B, C] and argmax == target [B, C] of one time chunk."""
    logits_BxCxV = model.logits(hidden_BxCxD)
    log_normalizer_BxC = jax.nn.logsumexp(logits_BxCxV, axis=-1)
    target_logit_BxC = jnp.take_along_axis(logits_BxCxV, targets_BxC[..., None], axis=-1)[..., 0]
    greedy_BxC = jnp.argmax(logits_BxCxV, axis=-1) == targets_BxC
    return target_logit_BxC - log_normalizer_BxC, greedy_BxC


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _score_batch(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    input_ids_BxT: jax.Array,
    target_ids_BxT: jax.Array,
    segment_ids_BxT: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """(log p(target) [B, T], argmax == target [B, T]) at every position; the logits are
    computed a time chunk at a time, so [B, T, V] never exists."""
    model = nnx.merge(graphdef, state)
    batch, length = input_ids_BxT.shape
    positions_BxT = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    hidden_BxTxD = model.hidden_states(input_ids_BxT, positions_BxT, segment_ids_BxT)
    chunk = time_chunk(length, _MAX_CHUNK)

    def per_chunk(carry: None, xs: tuple[jax.Array, jax.Array]):
        return carry, _chunk_scores(model, *xs)

    def chunks(x: jax.Array) -> jax.Array:  # [B, T, ...] -> [T / chunk, B, chunk, ...]
        return jnp.swapaxes(x.reshape(batch, length // chunk, chunk, *x.shape[2:]), 0, 1)

    _, (logps_NxBxC, greedy_NxBxC) = jax.lax.scan(
        per_chunk, None, (chunks(hidden_BxTxD), chunks(target_ids_BxT))
    )
    unchunk = lambda x: jnp.swapaxes(x, 0, 1).reshape(batch, length)  # noqa: E731
    return unchunk(logps_NxBxC), unchunk(greedy_NxBxC)


def batches(lengths: Sequence[int], batch_size: int) -> Iterator[tuple[list[int], int]]:
    """(the indices of a batch's sequences, its bucket length): longest first, batch_size rows
    at a time."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    for start in range(0, len(order), batch_size):
        indices = order[start : start + batch_size]
        yield indices, bucket(max(lengths[i] for i in indices), _MIN_LENGTH_BUCKET)


def _layout(
    sequences: Sequence[Sequence[int]], rows: int, length: int, pad_id: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """input_ids, target_ids and segment_ids [rows, length] as in the module docstring
    (segment 1 on real tokens, 0 on padding; a virtual token, id < 0, is never a target)."""
    input_ids = np.full((rows, length), pad_id, np.int32)
    target_ids = np.full((rows, length), pad_id, np.int32)
    segment_ids = np.zeros((rows, length), np.int32)
    for row, tokens in enumerate(sequences):
        count = len(tokens) - 1
        input_ids[row, :count] = tokens[:-1]
        target_ids[row, :count] = np.maximum(tokens[1:], 0)
        segment_ids[row, :count] = 1
    return input_ids, target_ids, segment_ids


def score(
    model: CausalLM,
    sequences: Sequence[Sequence[int]],
    scored: Sequence[int],
    *,
    batch_size: int,
    pad_id: int = 0,
) -> list[Scored]:
    """Scored(sum of log p, all greedy) of the last scored[i] tokens of each sequence given the
    tokens before them (each sequence holds at least scored[i] + 1 tokens)."""
    for tokens, count in zip(sequences, scored, strict=True):
        if not 0 < count < len(tokens):
            raise ValueError(f"score: {count} scored tokens of a {len(tokens)}-token sequence.")
    graphdef, state = nnx.split(model)
    results: list[Scored | None] = [None] * len(sequences)
    for indices, length in batches(
        [len(sequences[i]) - 1 for i in range(len(sequences))], batch_size
    ):
        arrays = _layout([sequences[i] for i in indices], batch_size, length, pad_id)
        logps_BxT, greedy_BxT = map(to_host, _score_batch(graphdef, state, *arrays))
        for row, index in enumerate(indices):
            end = len(sequences[index]) - 1
            window = slice(end - scored[index], end)
            results[index] = Scored(
                float(logps_BxT[row, window].astype(np.float64).sum()),
                bool(greedy_BxT[row, window].all()),
            )
    return results
