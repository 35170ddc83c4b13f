"""The rollout interface (generation/sampler.rollout): tokens from the live params, their
log-probs under the sampling distribution, and why each row stopped."""

from __future__ import annotations

import numpy as np
import pytest
from test_generate import EOS, NEW_TOKENS, PROMPTS
from test_models import jax_logits

from sft_jax.generation.sampler import generate, rollout
from sft_jax.models import from_pretrained
from sft_jax.train import sharding


@pytest.fixture(scope="module")
def qwen3_dir(hf_checkpoint):
    return hf_checkpoint("qwen3")[0]


def teacher_forced_logps(model, prompt: list[int], new: list[int], temperature: float):
    """log softmax(logits / T) of each new token, from one forward pass over prompt + new."""
    ids = np.asarray([prompt + new], np.int32)
    batch = {
        "input_ids": ids,
        "positions": np.arange(ids.shape[1], dtype=np.int32)[None],
        "segment_ids": np.ones_like(ids),
    }
    logits = jax_logits(model, batch)[0].astype(np.float64) / temperature
    logits -= logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    rows = np.arange(len(prompt) - 1, len(prompt) + len(new) - 1)
    return logp[rows, new]


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_rollout_logps_are_the_sampling_distributions(qwen3_dir, temperature):
    """Each token's log-prob equals a full forward pass's log softmax(logits / T) at it (T = 1
    when greedy); greedy tokens are generate's."""
    model = from_pretrained(qwen3_dir)
    options = {"max_new_tokens": NEW_TOKENS, "stop_token_ids": [EOS], "seed": 3}
    out = rollout(model, PROMPTS, temperature=temperature, **options)
    if temperature == 0.0:
        assert out.tokens == generate(model, PROMPTS, **options)
    for prompt, tokens, logps in zip(PROMPTS, out.tokens, out.logps, strict=True):
        assert len(tokens) == len(logps) > 0 and logps.dtype == np.float32
        expected = teacher_forced_logps(model, prompt, tokens, temperature or 1.0)
        np.testing.assert_allclose(logps, expected, rtol=1e-4, atol=1e-4)
        assert np.all(logps <= 0)


def test_rollout_says_why_each_row_stopped(qwen3_dir):
    model = from_pretrained(qwen3_dir)
    free = rollout(model, PROMPTS, max_new_tokens=NEW_TOKENS, stop_token_ids=[])
    assert free.stop_reasons == ["length"] * len(PROMPTS)
    assert all(len(t) == NEW_TOKENS for t in free.tokens)
    stop = free.tokens[0][2]
    stopped = rollout(model, PROMPTS, max_new_tokens=NEW_TOKENS, stop_token_ids=[stop])
    assert stopped.stop_reasons[0] == "stop" and stopped.tokens[0][-1] == stop
    for tokens, reason in zip(stopped.tokens, stopped.stop_reasons, strict=True):
        assert reason == ("stop" if tokens[-1] == stop else "length")
        assert reason == "stop" or len(tokens) == NEW_TOKENS
    empty = rollout(model, PROMPTS, max_new_tokens=0, stop_token_ids=[])
    assert empty.tokens == [[]] * 3 and empty.stop_reasons == ["length"] * 3


def test_rollout_from_sharded_params_equals_one_device(qwen3_dir):
    options = {"max_new_tokens": NEW_TOKENS, "stop_token_ids": [EOS], "temperature": 0.7}
    mesh = sharding.make_mesh(data=1, fsdp=4, tensor=2)
    sharded = rollout(from_pretrained(qwen3_dir, mesh=mesh), PROMPTS, **options)
    alone = rollout(from_pretrained(qwen3_dir), PROMPTS, **options)
    assert sharded.tokens == alone.tokens and sharded.stop_reasons == alone.stop_reasons
    for a, b in zip(sharded.logps, alone.logps, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
