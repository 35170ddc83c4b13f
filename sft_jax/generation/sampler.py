"""Batched generation with a KV cache: one prefill, then a jitted loop of one token per step.

Prompts are left-padded into one [B, T] batch so that every row's last prompt token sits in the
same slot; positions count from 0 at each prompt's first real token and are -1 on padding, which
the cache never attends, so a row generates exactly what it would alone. Example (T = 4):
  prompts   = [[5, 6, 7], [8]]
  tokens    = [[0, 5, 6, 7], [0, 0, 0, 8]]
  positions = [[-1, 0, 1, 2], [-1, -1, -1, 0]]
The batch, the prompt length and the number of new tokens are rounded up to powers of two, and
max_new_tokens, temperature, top_k, top_p, min_p and the seed are traced, so repeated calls (one
per eval, one per RL step) reuse one compilation per bucket.

`rollout` is the interface a batch producer (online RL) and eval generation share: from the
live, possibly sharded, params it returns each prompt's new tokens, their log-probs under the
sampling distribution and why each row stopped.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sft_jax.adapters.prompts import prompt_prefix_ids
from sft_jax.generation.prompt_images import image_fields
from sft_jax.models.decoder import CausalLM
from sft_jax.models.kv_cache import KVCache

_MIN_LENGTH_BUCKET = 16
# End-of-turn markers of common chat templates; a stop token when the template writes it.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>", "<|end|>")


def bucket(n: int, minimum: int = 1) -> int:
    """The smallest power of two >= max(n, minimum)."""
    return 1 << (max(n, minimum) - 1).bit_length()


def buckets(rows: int, prompt_len: int, max_new_tokens: int) -> tuple[int, int, int]:
    """(rows, prompt length, new tokens) rounded up as one compilation serves them."""
    return (
        bucket(rows),
        bucket(prompt_len, _MIN_LENGTH_BUCKET),
        bucket(max_new_tokens, _MIN_LENGTH_BUCKET),
    )


def left_pad(
    prompts: Sequence[Sequence[int]], batch: int, length: int, pad_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """tokens and positions [batch, length] as in the module docstring; rows past the prompts
    are all padding (they start done and their output is dropped)."""
    tokens_BxT = np.full((batch, length), pad_id, np.int32)
    positions_BxT = np.full((batch, length), -1, np.int32)
    for row, prompt in enumerate(prompts):
        tokens_BxT[row, length - len(prompt) :] = prompt
        positions_BxT[row, length - len(prompt) :] = np.arange(len(prompt))
    return tokens_BxT, positions_BxT


def top_k_cutoff(sorted_BxV: jax.Array, top_k: jax.Array) -> jax.Array:
    """[B, 1]: the k-th largest logit (ties with it stay, as transformers' TopKLogitsWarper
    keeps them), or -inf when top_k <= 0 (off). sorted_BxV is sorted descending."""
    vocab = sorted_BxV.shape[-1]
    kth_Bx1 = jnp.take(sorted_BxV, jnp.clip(top_k, 1, vocab) - 1, axis=-1)[:, None]
    return jnp.where(top_k > 0, kth_Bx1, -jnp.inf)


def top_p_cutoff(sorted_BxV: jax.Array, top_p: jax.Array) -> jax.Array:
    """[B, 1]: the smallest logit of the top-p nucleus, the smallest set of most likely tokens
    whose probabilities sum to at least top_p (transformers' TopPLogitsWarper); the most likely
    token always stays. -inf when top_p >= 1 (off: a float32 cumsum can reach 1 before the
    tail and would drop it). sorted_BxV is sorted descending, -inf where a filter dropped."""
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
    kept_BxV = jnp.where(mass_before_BxV < top_p, sorted_BxV, jnp.inf)
    cutoff_Bx1 = jnp.minimum(jnp.min(kept_BxV, axis=-1, keepdims=True), sorted_BxV[:, :1])
    return jnp.where(top_p < 1.0, cutoff_Bx1, -jnp.inf)


def min_p_cutoff(sorted_BxV: jax.Array, min_p: jax.Array) -> jax.Array:
    """[B, 1]: the logit of probability min_p times the most likely token's (transformers'
    MinPLogitsWarper: a ratio of probabilities, so renormalising after earlier filters changes
    nothing); -inf when min_p is 0 (off). sorted_BxV is sorted descending."""
    return sorted_BxV[:, :1] + jnp.log(min_p)


def filter_logits(
    logits_BxV: jax.Array, top_k: jax.Array, top_p: jax.Array, min_p: jax.Array
) -> jax.Array:
    """Logits with every token that top_k, then top_p, then min_p (the order of transformers'
    generate, each on what the one before kept) filters out set to -inf. Each keeps the tokens
    at or above a cutoff logit, so one sort serves all three. top_k 0, top_p 1, min_p 0: off."""
    sorted_BxV = jnp.flip(jnp.sort(logits_BxV, axis=-1), axis=-1)
    cutoff_Bx1 = jnp.full_like(sorted_BxV[:, :1], -jnp.inf)
    for cutoff_of, value in ((top_k_cutoff, top_k), (top_p_cutoff, top_p), (min_p_cutoff, min_p)):
        cutoff_Bx1 = jnp.maximum(cutoff_Bx1, cutoff_of(sorted_BxV, value))
        sorted_BxV = jnp.where(sorted_BxV >= cutoff_Bx1, sorted_BxV, -jnp.inf)
    return jnp.where(logits_BxV >= cutoff_Bx1, logits_BxV, -jnp.inf)


def nucleus(logits_BxV: jax.Array, top_p: jax.Array) -> jax.Array:
    """Logits with every token outside the top-p nucleus set to -inf (see top_p_cutoff)."""
    return filter_logits(logits_BxV, jnp.int32(0), top_p, jnp.float32(0.0))


def sample(
    logits_BxV: jax.Array,
    key: jax.Array,
    temperature: jax.Array,
    top_p: jax.Array,
    greedy: bool,
    *,
    top_k: jax.Array | int = 0,
    min_p: jax.Array | float = 0.0,
) -> tuple[jax.Array, jax.Array]:
    """Next tokens [B]: argmax when greedy, else a draw from softmax(logits / T) restricted to
    what filter_logits keeps (top_k, then top_p, then min_p, on the scaled logits), renormalised;
    and their log-probs [B] under softmax(logits / T) (T = 1 when greedy), float32, BEFORE any
    filter: the filters change which tokens can be drawn, never the reported log-prob (what an
    importance ratio of online RL divides by, and what a training forward recomputes)."""
    logits_BxV = logits_BxV.astype(jnp.float32)
    if greedy:
        token_B = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
        scaled_BxV = logits_BxV
    else:
        scaled_BxV = logits_BxV / temperature
        filtered_BxV = filter_logits(scaled_BxV, top_k, top_p, min_p)
        token_B = jax.random.categorical(key, filtered_BxV, axis=-1).astype(jnp.int32)
    logp_BxV = jax.nn.log_softmax(scaled_BxV, axis=-1)
    return token_B, jnp.take_along_axis(logp_BxV, token_B[:, None], axis=-1)[:, 0]


# (temperature, top_k, top_p, min_p): traced, so one compilation serves every value.
Sampling = tuple[jax.Array, jax.Array, jax.Array, jax.Array]
# (step, last tokens [B], done [B], new tokens [B, N], their log-probs [B, N], the KV cache).
Carry = tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array, KVCache]


def _sample_with(
    logits_BxV: jax.Array, key: jax.Array, sampling: Sampling, greedy: bool
) -> tuple[jax.Array, jax.Array]:
    temperature, top_k, top_p, min_p = sampling
    return sample(logits_BxV, key, temperature, top_p, greedy, top_k=top_k, min_p=min_p)


def prefill(
    model: CausalLM,
    tokens_BxT: jax.Array,
    positions_BxT: jax.Array,
    is_stop: jax.Array,
    sampling: Sampling,
    key: jax.Array,
    max_new_bucket: int,
    greedy: bool,
    images: dict[str, jax.Array] | None = None,
) -> Carry:
    """Every prompt token at once (the last slot holds each row's last prompt token), with the
    prompts' image fields where given, and the first new token: the carry `decode` continues
    from (step 1; padding rows start done)."""
    batch, prompt_len = tokens_BxT.shape
    cache = KVCache.empty(model.config, batch, prompt_len + max_new_bucket, model.dtype)
    hidden_BxTxD, cache = model.extend(tokens_BxT, positions_BxT, cache, images)
    first_B, first_logp_B = _sample_with(model.logits(hidden_BxTxD[:, -1]), key, sampling, greedy)
    out_BxN = jnp.zeros((batch, max_new_bucket), jnp.int32).at[:, 0].set(first_B)
    logps_BxN = jnp.zeros((batch, max_new_bucket), jnp.float32).at[:, 0].set(first_logp_B)
    done_B = is_stop[first_B] | (positions_BxT[:, -1] < 0)
    return jnp.int32(1), first_B, done_B, out_BxN, logps_BxN, cache


def decode(
    model: CausalLM,
    carry: Carry,
    next_position_B: jax.Array,
    is_stop: jax.Array,
    sampling: Sampling,
    key: jax.Array,
    until_step: jax.Array,
    greedy: bool,
) -> Carry:
    """One token per row per step until step `until_step` or every row is done: a row holds 0
    (log-prob 0) after its first stop token. next_position_B: the position of each row's
    first new token (its last prompt position + 1)."""

    def keep_going(carry: Carry) -> jax.Array:
        step, _, done_B, _, _, _ = carry
        return (step < until_step) & ~jnp.all(done_B)

    # Feed the token chosen at step - 1, choose the one at step.
    def decode_one(carry: Carry) -> Carry:
        step, last_B, done_B, out_BxN, logps_BxN, cache = carry
        positions_Bx1 = (next_position_B + step - 1)[:, None]
        hidden_Bx1xD, cache = model.extend(last_B[:, None], positions_Bx1, cache)
        step_key = jax.random.fold_in(key, step)
        token_B, logp_B = _sample_with(model.logits(hidden_Bx1xD[:, 0]), step_key, sampling, greedy)
        token_B = jnp.where(done_B, 0, token_B)
        logp_B = jnp.where(done_B, 0.0, logp_B)
        out_BxN = jax.lax.dynamic_update_slice_in_dim(out_BxN, token_B[:, None], step, axis=1)
        logps_BxN = jax.lax.dynamic_update_slice_in_dim(logps_BxN, logp_B[:, None], step, axis=1)
        return step + 1, token_B, done_B | is_stop[token_B], out_BxN, logps_BxN, cache

    return jax.lax.while_loop(keep_going, decode_one, carry)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_bucket", "greedy"))
def _generate_ids(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    tokens_BxT: jax.Array,
    positions_BxT: jax.Array,
    is_stop: jax.Array,
    max_new_tokens: jax.Array,
    temperature: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
    min_p: jax.Array,
    key: jax.Array,
    *,
    max_new_bucket: int,
    greedy: bool,
    images: dict[str, jax.Array] | None = None,
) -> tuple[jax.Array, jax.Array]:
    """New tokens [B, max_new_bucket] (a row holds 0 after its first stop token) and their
    log-probs (0 after the stop token)."""
    model = nnx.merge(graphdef, state)
    sampling = (temperature, top_k, top_p, min_p)
    carry = prefill(
        model, tokens_BxT, positions_BxT, is_stop, sampling, key, max_new_bucket, greedy, images
    )
    next_position_B = positions_BxT[:, -1] + 1
    carry = decode(model, carry, next_position_B, is_stop, sampling, key, max_new_tokens, greedy)
    return carry[3], carry[4]


@dataclasses.dataclass(frozen=True)
class Rollout:
    """What sampling from the policy gave, per prompt (the rollout interface)."""

    tokens: list[list[int]]  # the new tokens, ending with the stop token when one came
    logps: list[np.ndarray]  # float32 log-prob of each new token (see `sample`)
    stop_reasons: list[str]  # "stop": a stop token ended it; "length": max_new_tokens did


def rollout(
    model: CausalLM,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    stop_token_ids: Sequence[int],
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    seed: int = 0,
    pad_id: int = 0,
    images: Sequence[dict[str, np.ndarray] | None] | None = None,
) -> Rollout:
    """Samples a continuation of each prompt from `model` as it is now (the live params, on
    whatever mesh they are sharded over), up to max_new_tokens, ending with the first stop
    token when one is generated (included, as transformers does).

    temperature 0 is greedy decoding (the filters then do nothing); otherwise tokens are drawn
    from softmax(logits / temperature) restricted, as transformers' generate does in this
    order, to the top_k most likely tokens (0: off), then to the top_p nucleus (1: off), then to
    the tokens at least min_p times as likely as the most likely one (0: off), with keys folded
    from `seed`, so a call is reproducible for the same prompts, batch and seed. The log-probs
    are under softmax(logits / temperature) before the filters (see `sample`). images: per
    prompt, the processor's arrays of its images or None (generation/prompt_images.py).
    """
    check_sampling_options(top_k, top_p, min_p)
    if not prompts or max_new_tokens <= 0:
        return Rollout(
            [[] for _ in prompts],
            [np.zeros(0, np.float32) for _ in prompts],
            ["length" for _ in prompts],
        )
    if any(len(p) == 0 for p in prompts):
        raise ValueError("rollout: every prompt needs at least one token.")
    vocab_size = model.config.vocab_size
    is_stop = np.zeros(vocab_size, bool)  # [V]: which tokens end a row
    is_stop[[t for t in stop_token_ids if 0 <= t < vocab_size]] = True
    rows, length, max_new_bucket = buckets(len(prompts), max(map(len, prompts)), max_new_tokens)
    tokens_BxT, positions_BxT = left_pad(prompts, rows, length, pad_id)
    fields = image_fields(model.config, prompts, images, rows, length)
    graphdef, state = nnx.split(model)
    out_BxN, logps_BxN = _generate_ids(
        graphdef,
        state,
        tokens_BxT,
        positions_BxT,
        is_stop,
        np.int32(max_new_tokens),
        np.float32(max(temperature, 1e-6)),
        np.int32(top_k),
        np.float32(top_p),
        np.float32(min_p),
        jax.random.key(seed),
        max_new_bucket=max_new_bucket,
        greedy=temperature <= 0,
        images=fields,
    )
    return trimmed(out_BxN, logps_BxN, len(prompts), max_new_tokens, is_stop)


def trimmed(
    out_BxN: jax.Array, logps_BxN: jax.Array, count: int, max_new_tokens: int, is_stop: np.ndarray
) -> Rollout:
    """The Rollout of the first `count` rows: each row up to its first stop token."""
    rows = np.asarray(out_BxN)[:count, :max_new_tokens]
    logps = np.asarray(logps_BxN)[:count, :max_new_tokens]
    tokens = [_until_stop(row, is_stop) for row in rows]
    return Rollout(
        tokens,
        [row_logps[: len(row)] for row_logps, row in zip(logps, tokens, strict=True)],
        ["stop" if row and is_stop[row[-1]] else "length" for row in tokens],
    )


def check_sampling_options(top_k: int, top_p: float, min_p: float) -> None:
    """Raises ValueError on values transformers' warpers refuse (0 still means off)."""
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 0:
        raise ValueError(f"rollout: top_k must be an int >= 0 (0: off), not {top_k!r}.")
    if not 0.0 <= top_p <= 1.0:
        raise ValueError(f"rollout: top_p must be in [0, 1] (1: off), not {top_p!r}.")
    if not 0.0 <= min_p <= 1.0:
        raise ValueError(f"rollout: min_p must be in [0, 1] (0: off), not {min_p!r}.")


def lower_rollout(
    model: CausalLM,
    rows: int,
    prompt_len: int,
    max_new_tokens: int,
    state: nnx.State | None = None,
) -> Any:
    """The sampler's program for `rows` prompts of up to prompt_len tokens and max_new_tokens
    new ones (in rollout's buckets), lowered from abstract inputs and the model's variables as
    they are sharded (or `state`: abstract variables with shardings, the planner's): what a
    rollout of that shape will compile, before any sampling."""
    graphdef, own = nnx.split(model)
    abstract_state = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        own if state is None else state,
    )
    *shape, max_new_bucket = buckets(rows, prompt_len, max_new_tokens)
    tokens = jax.ShapeDtypeStruct(tuple(shape), jnp.int32)
    scalars = [jax.ShapeDtypeStruct((), dtype) for dtype in (jnp.int32, jnp.float32, jnp.int32)]
    return _generate_ids.lower(
        graphdef,
        abstract_state,
        tokens,
        tokens,
        jax.ShapeDtypeStruct((model.config.vocab_size,), jnp.bool_),
        *scalars,
        *(jax.ShapeDtypeStruct((), jnp.float32) for _ in range(2)),
        jax.eval_shape(lambda: jax.random.key(0)),
        max_new_bucket=max_new_bucket,
        greedy=False,
    )


def generate(model: CausalLM, prompts: Sequence[Sequence[int]], **options: Any) -> list[list[int]]:
    """The new tokens of each prompt (`rollout`'s tokens; options as for `rollout`)."""
    return rollout(model, prompts, **options).tokens


def _until_stop(tokens: np.ndarray, is_stop: np.ndarray) -> list[int]:
    stops = np.flatnonzero(is_stop[tokens])
    return tokens[: stops[0] + 1 if stops.size else len(tokens)].tolist()


# --- Chat: templates, stop tokens and decoding with a transformers tokenizer. ---


def chat_stop_token_ids(tokenizer: Any, model_dir: str | Path | None = None) -> list[int]:
    """The tokenizer's eos, the end-of-turn tokens its chat template writes, and the eos ids of
    model_dir/generation_config.json when present."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    vocab = tokenizer.get_vocab()
    ids |= {vocab[t] for t in END_OF_TURN_TOKENS if t in template and t in vocab}
    config_file = Path(model_dir) / "generation_config.json" if model_dir else None
    if config_file is not None and config_file.exists():
        eos = json.loads(config_file.read_text()).get("eos_token_id")
        ids |= set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    return sorted(ids)


def reply(
    model: CausalLM,
    tokenizer: Any,
    prompt_ids: Sequence[int],
    *,
    stop_token_ids: Sequence[int],
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    seed: int = 0,
    images: dict[str, np.ndarray] | None = None,
) -> str:
    """The decoded continuation of prompt_ids, without its stop token and special tokens. A
    model with virtual tokens (prompt tuning, P-tuning) reads them first, as in training.
    images: the processor's arrays of the prompt's images (an image-text model)."""
    (new_ids,) = generate(
        model,
        [prompt_prefix_ids(model) + list(prompt_ids)],
        max_new_tokens=max_new_tokens,
        stop_token_ids=stop_token_ids,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        seed=seed,
        pad_id=tokenizer.pad_token_id or 0,
        images=None if images is None else [images],
    )
    if new_ids and new_ids[-1] in stop_token_ids:
        new_ids = new_ids[:-1]
    return tokenizer.decode(new_ids, skip_special_tokens=True)


def chat_prompt_ids(tokenizer: Any, messages: Sequence[dict[str, str]]) -> list[int]:
    """messages rendered by the chat template with the assistant's turn opened, as token ids
    (no special tokens added: the template writes BOS itself)."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def chat(
    model: CausalLM, tokenizer: Any, messages: Sequence[dict[str, str]], **options: Any
) -> str:
    """The assistant's reply to a conversation; options as for `reply` (stop_token_ids needed)."""
    return reply(model, tokenizer, chat_prompt_ids(tokenizer, messages), **options)
