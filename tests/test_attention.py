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


def assert_grads_close(grads: dict, expected: dict, rtol: float) -> None:
    for (path, g), e in zip(
        jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(expected), strict=True
    ):
        np.testing.assert_allclose(g, e, rtol=rtol, atol=1e-6, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("family", ["llama3.1", "llama3.2", "mistral", "qwen3", "gemma3"])
def test_fused_attention_equals_the_einsum_path(family, monkeypatch):
    monkeypatch.setitem(decoder.FUSED_IMPLEMENTATION, "cudnn", None)  # jax's XLA kernel on CPU
    reference, fused = model_pair(family)
    batch = synthetic_batch(7)  # two packed documents per row, padding, windows shorter
    expected_loss, expected_grads = loss_and_grads(reference, batch)
    loss, grads = loss_and_grads(fused, batch)
    assert loss == pytest.approx(expected_loss, rel=1e-6)
    assert_grads_close(grads, expected_grads, rtol=1e-4)


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


# The cuDNN kernel exists only on NVIDIA GPUs, which CPU CI lacks; on CPU the tests above run
# the same call through jax's XLA kernel. benchmarks/gpu_check.sh runs this on a GPU.
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


def long_batch(seed: int, rows: int = 2, seq_len: int = 128) -> dict[str, np.ndarray]:
    """Rows of 128 tokens (the splash kernel's smallest tile): three packed documents, padding."""
    rng = np.random.default_rng(seed)
    keys = ("input_ids", "target_ids", "positions", "segment_ids")
    batch = {k: np.zeros((rows, seq_len), np.int32) for k in keys}
    batch["target_mask"] = np.zeros((rows, seq_len), bool)
    for r in range(rows):
        start = 0
        for segment, length in enumerate(rng.integers(10, 40, size=3), start=1):
            tokens = rng.integers(3, 128, size=length)
            span = slice(start, start + length)
            batch["input_ids"][r, span] = tokens
            batch["target_ids"][r, start : start + length - 1] = tokens[1:]
            batch["positions"][r, span] = np.arange(length)
            batch["segment_ids"][r, span] = segment
            batch["target_mask"][r, start : start + length - 1] = True
            start += length
    return batch


@pytest.mark.parametrize("family", ["llama3.1", "mistral", "qwen3", "gemma2", "gemma3"])
def test_splash_attention_equals_the_einsum_path(family, monkeypatch):
    """The TPU splash kernel, run by the Pallas interpreter on CPU: segment ids, causal and
    sliding-window masks, GQA grouping and (gemma2) logit soft-capping."""
    monkeypatch.setitem(decoder.SPLASH_INTERPRET, "interpret", True)
    config = from_hf_config(hf_config(family))
    reference = CausalLM(config, rngs=nnx.Rngs(0))
    splash = CausalLM(dataclasses.replace(config, attention="splash"), rngs=nnx.Rngs(0))
    batch = long_batch(3)
    expected_loss, expected_grads = loss_and_grads(reference, batch)
    loss, grads = loss_and_grads(splash, batch)
    assert loss == pytest.approx(expected_loss, rel=1e-5)
    assert_grads_close(grads, expected_grads, rtol=1e-3)


def test_splash_attention_on_a_sharded_mesh_trains_like_the_einsum_path(monkeypatch):
    """Train steps on fsdp=4 x tensor=2: the kernel runs per shard (rows and kv heads split)."""
    from test_step import train_config

    from sft_jax import sharding
    from sft_jax.optim import make_optimizer
    from sft_jax.step import StepOptions, build_steps, device_batch, init_state

    monkeypatch.setitem(decoder.SPLASH_INTERPRET, "interpret", True)
    mesh = sharding.make_mesh(data=1, fsdp=4, tensor=2)
    config = from_hf_config(hf_config("llama3.1"))
    batches = [long_batch(seed, rows=4) for seed in (5, 6)]
    curves = {}
    for kind in ("xla", "splash"):
        model = CausalLM(dataclasses.replace(config, attention=kind), rngs=nnx.Rngs(0))
        tx, schedule = make_optimizer(train_config())
        state, shardings = init_state(model, tx, mesh)
        steps = build_steps(model, tx, schedule, mesh, shardings, train_rows=4, eval_rows=4,
                            seq_len=128, options=StepOptions(loss_chunk_size=32))  # fmt: skip
        curves[kind] = []
        for batch in batches:
            state, metrics = steps.train(state, device_batch(batch, steps.batch_shardings))
            curves[kind].append([float(metrics["train/loss"]), float(metrics["train/grad_norm"])])
    np.testing.assert_allclose(curves["splash"], curves["xla"], rtol=1e-4)


def test_kernels_the_backend_lacks_are_config_errors(monkeypatch):
    from configs import base
    from sft_jax import sharding
    from sft_jax.errors import ConfigError
    from sft_jax.model_setup import build_model

    config = base.get_config()
    mesh = sharding.single_device_mesh()
    for kind, needs in (("splash", "is a TPU kernel"), ("cudnn", "needs an NVIDIA GPU")):
        config.model.attention = kind
        with pytest.raises(ConfigError, match=needs):
            build_model(config, mesh)
    monkeypatch.setitem(decoder.SPLASH_INTERPRET, "interpret", True)
    config.model.attention = "splash"
    config.data.max_length = 100
    with pytest.raises(ConfigError, match="must be a multiple of 128"):
        build_model(config, mesh)
