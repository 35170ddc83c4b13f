"""The policy's entropy online RL logs (TRL's `entropy`): chunked, on a mesh with the
vocabulary split, equal to the entropy of the full softmax(logits / temperature)."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx
from hf_models import hf_config
from test_step import synthetic_batch

from sft_jax.models import CausalLM, from_hf_config
from sft_jax.objectives.loss import hidden_token_entropy
from sft_jax.train import sharding


def numpy_entropy(model: CausalLM, batch: dict, temperature: float) -> np.ndarray:
    logits = (
        np.asarray(
            nnx.jit(lambda m: m(batch["input_ids"], batch["positions"], batch["segment_ids"]))(
                model
            ),
            np.float64,
        )
        / temperature
    )
    logits -= logits.max(-1, keepdims=True)
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    return -(p * np.log(p)).sum(-1)


@pytest.mark.parametrize(
    "family, mesh_shape, temperature",
    [("gemma2", None, 0.7), ("gemma2", (1, 4, 2), 1.0), ("llama3.2", (2, 2, 2), 1.3)],
)
def test_entropy_is_the_full_softmaxs_on_one_device_and_a_mesh(family, mesh_shape, temperature):
    config = dataclasses.replace(from_hf_config(hf_config(family)), vocab_size=128)
    model = CausalLM(config, rngs=nnx.Rngs(0))
    batch = synthetic_batch(3, vocab=128)

    @nnx.jit
    def entropy(model):
        hidden, _ = model.forward(batch["input_ids"], batch["positions"], batch["segment_ids"])
        return hidden_token_entropy(model, hidden, max_chunk=4, temperature=temperature)

    if mesh_shape is None:
        got = entropy(model)
    else:
        with jax.set_mesh(sharding.make_mesh(*mesh_shape)):
            got = entropy(model)
    np.testing.assert_allclose(np.asarray(got), numpy_entropy(model, batch, temperature), rtol=2e-5)
