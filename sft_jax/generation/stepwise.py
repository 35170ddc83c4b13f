"""The KV-cache sampler run a few steps at a time, so the host can end rows early on what
only it can check (a stop string in the decoded text: lm-eval's `until`).

The same prefill and decode steps as sampler.rollout (sampler.prefill, sampler.decode), with the
same keys, so every row's tokens equal rollout's up to where it stops; between chunks of
`check_every` steps the host reads the tokens of the rows still going and marks those that
`stopped(row, tokens)` says are finished as done: they generate nothing more (padding from
there, as after a stop token) and the loop ends once every row is done or max_new_tokens is
reached. A chunk compiles once per bucket (its end step is traced) and takes the carry, KV cache
included, as a donated buffer. Over several processes every process runs the same steps and
reads the same tokens (gathered), so each ends the same rows.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import numpy as np
from flax import nnx

from sft_jax.generation import sampler
from sft_jax.generation.sampler import Carry, Rollout, Sampling
from sft_jax.models.decoder import CausalLM
from sft_jax.models.io.hf import to_host

CHECK_EVERY = 8  # decode steps between two looks at the rows' tokens


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_bucket", "greedy"))
def _start(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    tokens_BxT: jax.Array,
    positions_BxT: jax.Array,
    is_stop: jax.Array,
    sampling: Sampling,
    key: jax.Array,
    *,
    max_new_bucket: int,
    greedy: bool,
) -> Carry:
    model = nnx.merge(graphdef, state)
    return sampler.prefill(
        model, tokens_BxT, positions_BxT, is_stop, sampling, key, max_new_bucket, greedy
    )


@functools.partial(jax.jit, static_argnames=("graphdef", "greedy"), donate_argnames=("carry",))
def _continue(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    carry: Carry,
    next_position_B: jax.Array,
    is_stop: jax.Array,
    sampling: Sampling,
    key: jax.Array,
    until_step: jax.Array,
    *,
    greedy: bool,
) -> Carry:
    model = nnx.merge(graphdef, state)
    return sampler.decode(model, carry, next_position_B, is_stop, sampling, key, until_step, greedy)


@dataclasses.dataclass(frozen=True)
class Stepped:
    """A rollout whose rows may have been ended by the host, and the steps it ran."""

    rollout: Rollout  # a row ended by the host: its tokens up to there, stop reason "until"
    steps: int  # new-token steps run for the batch (the prefill's token counts as one)


def rollout_until(
    model: CausalLM,
    prompts: Sequence[Sequence[int]],
    stopped: Callable[[int, list[int]], bool],
    *,
    max_new_tokens: int,
    stop_token_ids: Sequence[int],
    check_every: int = CHECK_EVERY,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    seed: int = 0,
    pad_id: int = 0,
) -> Stepped:
    """sampler.rollout's continuations (same options, same tokens), each row also ended as
    soon as stopped(row, its new tokens so far) is true, looked at every check_every steps."""
    if not prompts or max_new_tokens <= 0 or any(len(p) == 0 for p in prompts):
        options = dict(max_new_tokens=max_new_tokens, stop_token_ids=stop_token_ids)
        return Stepped(sampler.rollout(model, prompts, **options, pad_id=pad_id), 0)
    sampler.check_sampling_options(top_k, top_p, min_p)
    vocab_size = model.config.vocab_size
    is_stop = np.zeros(vocab_size, bool)
    is_stop[[t for t in stop_token_ids if 0 <= t < vocab_size]] = True
    rows, length, max_new_bucket = sampler.buckets(
        len(prompts), max(map(len, prompts)), max_new_tokens
    )
    tokens_BxT, positions_BxT = sampler.left_pad(prompts, rows, length, pad_id)
    graphdef, state = nnx.split(model)
    sampling = (
        np.float32(max(temperature, 1e-6)), np.int32(top_k), np.float32(top_p), np.float32(min_p)
    )  # fmt: skip
    key, greedy = jax.random.key(seed), temperature <= 0
    carry = _start(
        graphdef, state, tokens_BxT, positions_BxT, is_stop, sampling, key,
        max_new_bucket=max_new_bucket, greedy=greedy,
    )  # fmt: skip
    ended: dict[int, int] = {}  # row -> how many tokens it keeps
    while True:
        step, done_B = int(to_host(carry[0])), to_host(carry[2])
        if step >= max_new_tokens or done_B.all():
            break
        done_B = _mark_stopped(carry[3], done_B, step, len(prompts), stopped, ended)
        if done_B.all():
            break
        carry = (carry[0], carry[1], _placed_like(done_B, carry[2]), *carry[3:])
        until = np.int32(min(step + check_every, max_new_tokens))
        carry = _continue(
            graphdef, state, carry, positions_BxT[:, -1] + 1, is_stop, sampling, key, until,
            greedy=greedy,
        )  # fmt: skip
    out_BxN, logps_BxN = to_host(carry[3]), to_host(carry[4])
    rollout = sampler.trimmed(out_BxN, logps_BxN, len(prompts), max_new_tokens, is_stop)
    return Stepped(_cut(rollout, ended), int(to_host(carry[0])))


def _mark_stopped(
    out_BxN: jax.Array,
    done_B: np.ndarray,
    step: int,
    count: int,
    stopped: Callable[[int, list[int]], bool],
    ended: dict[int, int],
) -> np.ndarray:
    """done_B with the rows still going that `stopped` ends now marked (and noted in `ended`)."""
    done_B = done_B.copy()
    tokens = to_host(out_BxN)[:count, :step]
    for row in np.flatnonzero(~done_B[:count]):
        if stopped(int(row), tokens[row].tolist()):
            done_B[row], ended[int(row)] = True, step
    return done_B


def _placed_like(value: np.ndarray, like: jax.Array) -> jax.Array:
    """The host value (the same on every process) laid out as `like` is."""
    return jax.make_array_from_callback(value.shape, like.sharding, lambda index: value[index])


def _cut(rollout: Rollout, ended: dict[int, int]) -> Rollout:
    """The rollout with each host-ended row cut to the tokens it had when it was ended."""
    tokens, logps, reasons = list(rollout.tokens), list(rollout.logps), list(rollout.stop_reasons)
    for row, kept in ended.items():
        tokens[row], logps[row], reasons[row] = tokens[row][:kept], logps[row][:kept], "until"
    return Rollout(tokens, logps, reasons)
