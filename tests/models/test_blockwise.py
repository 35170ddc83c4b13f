"""Blockwise (flash-style) attention, models/blockwise.py, against the einsum path: the loss and
every gradient of tiny models, in float32, with several blocks per row (and a row padded up to
a whole block), packed documents, padding, sliding windows, GQA and soft-capping."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_models import hf_config
from test_attention import assert_grads_close, loss_and_grads
from test_step import synthetic_batch

from configs import base
from sft_jax.core.errors import ConfigError
from sft_jax.core.spec import RunSpec
from sft_jax.models import CausalLM, from_hf_config
from sft_jax.models.attention import attention_mask
from sft_jax.models.kernels import blockwise
from sft_jax.train import config_check
from sft_jax.train.kernel_choice import choose_attention


def test_blockwise_model_equals_the_einsum_path(monkeypatch):
    """gemma2 on 16-token rows of two documents and padding, 4-token blocks: soft-capped
    logits, sliding (5 tokens) and full layers alternating, 2 query heads per key/value head."""
    monkeypatch.setitem(blockwise.BLOCK, "tokens", 4)
    config = from_hf_config(hf_config("gemma2"))
    reference = CausalLM(config, rngs=nnx.Rngs(0))
    flash = CausalLM(dataclasses.replace(config, attention="blockwise"), rngs=nnx.Rngs(0))
    batch = synthetic_batch(7)
    expected_loss, expected_grads = loss_and_grads(reference, batch)
    loss, grads = loss_and_grads(flash, batch)
    assert loss == pytest.approx(expected_loss, rel=1e-5)
    assert_grads_close(grads, expected_grads, rtol=1e-5)


def einsum_attention(q, k, v, segment_ids_BxT, scale, window, softcap):
    """The einsum path's attention (attention.py), on its own."""
    positions = jnp.broadcast_to(jnp.arange(q.shape[1]), segment_ids_BxT.shape)
    mask = attention_mask(segment_ids_BxT, positions, window)
    scores = jnp.einsum("BTKGE,BSKE->BKGTS", q, k) * scale
    if softcap is not None:
        scores = jnp.tanh(scores / softcap) * softcap
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    out = jnp.einsum("BKGTS,BSKE->BTKGE", jax.nn.softmax(scores, axis=-1), v)
    return out.reshape(*q.shape[:2], -1)


@pytest.mark.parametrize("window, softcap", [(None, None), (6, 2.0)])
def test_blockwise_function_equals_einsums_with_padded_blocks(window, softcap, monkeypatch):
    """One key/value head for 4 queries, 3 documents and padding in 22-token rows, 5-token
    blocks (rows padded to 25): output and the gradients of q, k and v."""
    monkeypatch.setitem(blockwise.BLOCK, "tokens", 5)
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (2, 22, 1, 4, 8))
    k, v = (jax.random.normal(key, (2, 22, 1, 8)) for key in keys[1:3])
    segments = jnp.asarray([[1] * 7 + [2] * 9 + [3] * 4 + [0] * 2, [1] * 15 + [2] * 7])
    cotangent = jax.random.normal(keys[3], (2, 22, 32))
    results = []
    for attend in (einsum_attention, blockwise.blockwise_attention):
        bound = functools.partial(attend, segment_ids_BxT=segments, scale=0.3, window=window,
                                  softcap=softcap)  # fmt: skip
        out, vjp = jax.vjp(bound, q, k, v)
        results.append((out, *vjp(cotangent)))
    for got, want in zip(results[1], results[0], strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_blockwise_saves_no_score_matrix():
    """What the planner relies on: the backward pass keeps q, k, v, the output and one
    log-sum-exp per query, so the memory of a long row grows with T, not T x S."""
    batch, seq_len, heads, dim = 1, 4096, 2, 16
    q = jnp.zeros((batch, seq_len, heads, 1, dim))
    k = v = jnp.zeros((batch, seq_len, heads, dim))
    segments = jnp.ones((batch, seq_len), jnp.int32)

    def loss(q, k, v):
        return blockwise.blockwise_attention(q, k, v, segments, 0.25, None, None).sum()

    residuals = jax.vjp(loss, q, k, v)[1]
    saved = sum(x.size for x in jax.tree.leaves(residuals) if hasattr(x, "size"))
    assert saved < 8 * batch * seq_len * heads * dim  # a [T, S] score matrix: 32M floats
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile()
    temporaries = compiled.memory_analysis().temp_size_in_bytes
    # A few [512, 512] blocks of scores at a time: under a tenth of one float32 score matrix.
    assert temporaries < seq_len * seq_len * heads * 4 / 10


def test_blockwise_is_a_config_choice_on_every_backend():
    config = base.get_config()
    config.model.attention = "blockwise"
    config_check.check_values(RunSpec.of(config), device_count=1, batch_shards=1)
    config.model.attention = "flash"
    with pytest.raises(ConfigError, match=r"model\.attention"):
        config_check.check_values(RunSpec.of(config), device_count=1, batch_shards=1)
    model = from_hf_config(hf_config("gemma2"))  # soft-capping: no cuDNN, but blockwise
    for accelerator in ("cpu", "nvidia", "tpu"):
        kind, _ = choose_attention("blockwise", accelerator=accelerator, model=model,
                                   compute_dtype="float32", max_length=100)  # fmt: skip
        assert kind == "blockwise"
    np.testing.assert_equal(blockwise.BLOCK["tokens"] % 128, 0)  # whole tiles of the kernels
