"""The fused-attention path (config.model.attention="cudnn") against the einsum reference.

On CPU the fused path runs jax.nn.dot_product_attention's XLA implementation, which checks
everything of ours around the kernel: head grouping, scale, packing/causal/window masks. The
cuDNN kernel itself needs an NVIDIA GPU (benchmarks/bench_train.py --attention=cudnn there).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
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


def _relative_error(grads: dict, reference: dict) -> float:
    leaves, expected = jax.tree.leaves(grads), jax.tree.leaves(reference)
    num = sum(
        float(np.sum((np.float64(g) - e) ** 2)) for g, e in zip(leaves, expected, strict=True)
    )
    return (num / sum(float(np.sum(np.float64(e) ** 2)) for e in expected)) ** 0.5


@pytest.mark.skipif(
    jax.default_backend() != "gpu",
    reason="needs an NVIDIA GPU: JAX_PLATFORMS=cuda pytest tests/test_attention.py",
)
@pytest.mark.parametrize("family", ["llama3.1", "mistral", "qwen3", "gemma3"])
def test_cudnn_kernel_is_as_close_to_float32_as_bf16_einsums(family):
    """On a GPU: the real cuDNN kernel (bf16, as it requires) against float32 einsums; its
    loss and gradient errors must be those of bf16 einsum attention, not larger."""
    config = from_hf_config(hf_config(family))
    exact = CausalLM(config, rngs=nnx.Rngs(0))
    einsum = CausalLM(config, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    cudnn = CausalLM(dataclasses.replace(config, attention="cudnn"), dtype=jnp.bfloat16,
                     rngs=nnx.Rngs(0))  # fmt: skip
    batch = synthetic_batch(7)
    exact_loss, exact_grads = loss_and_grads(exact, batch)
    einsum_loss, einsum_grads = loss_and_grads(einsum, batch)
    cudnn_loss, cudnn_grads = loss_and_grads(cudnn, batch)
    assert abs(cudnn_loss - exact_loss) <= 2 * abs(einsum_loss - exact_loss) + 2e-3 * exact_loss
    einsum_error = _relative_error(einsum_grads, exact_grads)
    assert _relative_error(cudnn_grads, exact_grads) <= 2 * einsum_error + 1e-3
