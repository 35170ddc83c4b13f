"""remat="offload": matmul outputs kept in pinned host memory; refused where the backend has
none apart from the device's (CPU), counted by the memory plan, tried by remat="auto"."""

from __future__ import annotations

import types

import jax
import numpy as np
import pytest
from flax import nnx
from hf_models import hf_config
from test_step import synthetic_batch

from configs import base
from sft_jax.core.errors import ConfigError
from sft_jax.core.spec import RunSpec
from sft_jax.models import CausalLM, from_hf_config
from sft_jax.objectives.loss import loss_sums
from sft_jax.train import compiled as compile_plan
from sft_jax.train import memory as memory_plan
from sft_jax.train.config_check import check_values
from sft_jax.train.memory import StepMemory


def test_offload_on_cpu_is_a_config_error():
    config = base.get_config()
    config.model.remat = "offload"
    with pytest.raises(ConfigError, match=r"model\.remat='offload'.*cpu backend.*'full'"):
        check_values(RunSpec.of(config), device_count=8, batch_shards=8)


def test_offload_policy_leaves_gradients_unchanged():
    """The policy as the decoder applies it: same loss and gradients as keeping everything."""
    batch = synthetic_batch(0, rows=2)
    results = []
    for remat in ("none", "offload"):
        model = CausalLM(from_hf_config(hf_config("qwen3", num_hidden_layers=1)), rngs=nnx.Rngs(0))
        model.remat = remat
        graphdef, params = nnx.split(model, nnx.Param)

        def loss(params, graphdef=graphdef):
            sums = loss_sums(nnx.merge(graphdef, params), batch, max_chunk=8)
            return sums.nll / sums.target_tokens

        results.append(jax.jit(jax.value_and_grad(loss))(params))
    (loss_none, grads_none), (loss_offload, grads_offload) = results
    np.testing.assert_allclose(loss_offload, loss_none, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads_offload), jax.tree.leaves(grads_none), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_memory_plan_counts_offloaded_bytes_and_auto_tries_offload(monkeypatch):
    stats = types.SimpleNamespace(
        argument_size_in_bytes=2**30, output_size_in_bytes=2**30, alias_size_in_bytes=2**30,
        temp_size_in_bytes=2**31, generated_code_size_in_bytes=0,
        host_temp_size_in_bytes=3 * 2**30,
    )  # fmt: skip
    plan = StepMemory.of(types.SimpleNamespace(memory_analysis=lambda: stats))
    assert plan.host_temporaries == 3 * 2**30
    assert plan.total == 3 * 2**30  # device memory only: the offloaded bytes live on the host
    assert "3.00 GiB offloaded to host memory" in plan.describe()
    assert "offload" not in compile_plan.auto_remat_policies()  # this CPU backend
    monkeypatch.setattr(memory_plan, "host_offload_supported", lambda: True)
    assert compile_plan.auto_remat_policies() == ("none", "save_matmuls", "offload", "full")
