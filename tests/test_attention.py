"""The fused-attention path (config.model.attention="cudnn") against the einsum reference.

On CPU the fused path runs jax.nn.dot_product_attention's XLA implementation, which checks
everything of ours around the kernel: head grouping, scale, packing/causal/window masks. The
cuDNN kernel itself needs an NVIDIA GPU (benchmarks/bench_train.py --attention=cudnn there).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx
from hf_models import hf_config
from test_step import synthetic_batch

from sft_jax.loss import loss_sums
from sft_jax.models import CausalLM, UnsupportedModelError, decoder, from_hf_config


def model_pair(family: str) -> tuple[CausalLM, CausalLM]:
    config = from_hf_config(hf_config(family))
    reference = CausalLM(config, rngs=nnx.Rngs(0))
    fused = CausalLM(dataclasses.replace(config, attention="cudnn"), rngs=nnx.Rngs(0))
    return reference, fused


def loss_and_grads(model: CausalLM, batch: dict) -> tuple[float, dict]:
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(params):
        sums = loss_sums(nnx.merge(graphdef, params), batch, max_chunk=8)
        return sums.nll / sums.target_tokens

    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    return float(value), nnx.to_pure_dict(grads)


@pytest.mark.parametrize("family", ["llama3.1", "llama3.2", "mistral", "qwen3", "gemma3"])
def test_fused_attention_equals_the_einsum_path(family, monkeypatch):
    monkeypatch.setitem(decoder.FUSED_IMPLEMENTATION, "cudnn", None)  # jax's XLA kernel on CPU
    reference, fused = model_pair(family)
    batch = synthetic_batch(7)  # two packed documents per row, padding, windows shorter
    expected_loss, expected_grads = loss_and_grads(reference, batch)
    loss, grads = loss_and_grads(fused, batch)
    assert loss == pytest.approx(expected_loss, rel=1e-6)
    for (path, g), e in zip(
        jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(expected_grads), strict=True
    ):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_fused_attention_refuses_soft_capping():
    config = dataclasses.replace(from_hf_config(hf_config("gemma2")), attention="cudnn")
    with pytest.raises(UnsupportedModelError, match="cannot soft-cap"):
        CausalLM(config, rngs=nnx.Rngs(0))
