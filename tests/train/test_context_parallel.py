"""Context parallelism: the sequence split over the mesh's context axis gives the loss and the
gradients of one device, on packed rows whose documents cross the shards' boundaries."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hf_models import hf_config, save_hf_model
from jax.tree_util import keystr
from test_step import packed_rows, step_builder, train_config

from configs import base
from sft_jax.adapters.lora import LoRASpec, apply_lora, trainable_filter
from sft_jax.core.errors import ConfigError
from sft_jax.core.spec import RunSpec
from sft_jax.models import CausalLM, from_hf_config, from_pretrained
from sft_jax.models.decoder import decoder_linears, use_attention
from sft_jax.models.kernels import blockwise
from sft_jax.models.kernels import fused as kernels
from sft_jax.models.partitioning import balanced_order, context_layout
from sft_jax.models.quantize import QuantSpec
from sft_jax.objectives.loss import CrossEntropy
from sft_jax.planning import estimate as plan_estimate
from sft_jax.planning import search as plan_search
from sft_jax.train import kernel_choice, sharding
from sft_jax.train.compiled import init_state
from sft_jax.train.config_check import check_values
from sft_jax.train.optim import make_optimizer
from sft_jax.train.step import StepSpec, gradients

SEQ_LEN = 64  # 2 x 8 chunks of 4 tokens at context=8
# Documents per row (lengths); they straddle the shards' chunk boundaries; padding at the end.
DOCUMENTS = ((23, 17, 13, 11), (5, 40, 10), (64,), (9, 9, 30))


def packed_batch(seed: int = 0) -> dict[str, np.ndarray]:
    return packed_rows(np.random.default_rng(seed), DOCUMENTS, SEQ_LEN, vocab=128, trained=0.8)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """family -> a saved tiny random checkpoint (written on first use)."""
    paths = {}

    def path_of(family: str):
        if family not in paths:
            paths[family] = tmp_path_factory.mktemp(family.replace(".", "_"))
            save_hf_model(family, paths[family], num_hidden_layers=2)  # compile time
        return paths[family]

    return path_of


def tiny_model(path, mesh=None, lora: LoRASpec | None = None, remat: str = "none") -> CausalLM:
    mesh = mesh or sharding.single_device_mesh()
    quantization = lora.quantization if lora is not None else None
    model = from_pretrained(path, mesh=mesh, quantization=quantization)
    model.remat = remat
    if lora is not None:
        apply_lora(model, lora, mesh)
        for _, _, linear in decoder_linears(model):  # B != 0: every adapter has gradients
            linear.lora_b[...] = 0.1 * jnp.ones_like(linear.lora_b[...])
    return model


def loss_and_grads(model: CausalLM, mesh, trainable=nnx.Param) -> tuple[float, dict]:
    """The train step's gradients (step.gradients on context_layout's batch, as train_step
    runs it) of the mean loss over the batch's target tokens, on `mesh`."""
    graphdef, params, frozen = nnx.split(model, trainable, ...)
    spec = StepSpec(graphdef, optax.sgd(1.0), lambda step: 1.0, CrossEntropy(0.0, 8))
    batch = packed_batch()
    with jax.set_mesh(mesh):
        params = jax.device_put(
            nnx.to_pure_dict(params), sharding.param_shardings(model, mesh, trainable)
        )
        frozen = jax.device_put(
            nnx.to_pure_dict(frozen), sharding.param_shardings(model, mesh, nnx.Not(trainable))
        )
        # From the whole batch, each process taking its shards: the step alone (the trainer's
        # feed across processes, sharding.device_batch, is tests/train/test_context_feed.py's).
        device_batch = {
            key: jax.make_array_from_callback(batch[key].shape, shards, batch[key].__getitem__)
            for key, shards in sharding.batch_shardings(mesh).items()
        }

        @jax.jit
        def run(params, frozen, batch):
            batch = context_layout(batch)
            grads, sums = gradients(spec, params, frozen, batch, jax.random.key(0))
            return sums.nll / spec.objective.normalizer(batch), grads

        loss, grads = run(params, frozen, device_batch)
    return float(loss), jax.device_get(grads)


def assert_same(actual: tuple[float, dict], expected: tuple[float, dict]) -> None:
    np.testing.assert_allclose(actual[0], expected[0], rtol=1e-5)
    for path, grad in jax.tree_util.tree_flatten_with_path(expected[1])[0]:
        got = jax.tree_util.tree_flatten_with_path(actual[1])[0]
        value = dict((jax.tree_util.keystr(p), g) for p, g in got)[jax.tree_util.keystr(path)]
        scale = np.abs(grad).max()
        assert scale > 0, f"{jax.tree_util.keystr(path)}: the test needs nonzero gradients"
        np.testing.assert_allclose(value, grad, rtol=0, atol=1e-5 * scale, err_msg=str(path))


def test_balanced_order_pairs_mirror_chunks():
    order = balanced_order(16, 4)  # 8 chunks of 2: shard i holds chunks i and 7 - i
    np.testing.assert_array_equal(order[:4], [0, 1, 14, 15])
    np.testing.assert_array_equal(order[12:], [6, 7, 8, 9])
    assert sorted(order) == list(range(16))
    # Causal work (keys before each query) is equal on every shard.
    work = [(order[i * 4 : (i + 1) * 4] + 1).sum() for i in range(4)]
    assert len(set(work)) == 1


@pytest.fixture(scope="module")
def single_device(checkpoint):
    return loss_and_grads(tiny_model(checkpoint("llama3.1")), sharding.single_device_mesh())


@pytest.mark.parametrize(
    "fsdp,context,tensor,remat,attention",
    [(1, 2, 1, "none", "xla"), (1, 4, 1, "none", "xla"), (1, 8, 1, "none", "xla"),
     (2, 4, 1, "full", "xla"), (1, 4, 2, "none", "xla"), (1, 2, 1, "none", "blockwise"),
     (1, 4, 1, "none", "blockwise")],
    ids=["context2", "context4", "context8", "fsdp2xcontext4_remat", "context4xtensor2",
         "context2_blockwise", "context4_blockwise"],
)  # fmt: skip
def test_context_parallel_equals_one_device(
    checkpoint, single_device, fsdp, context, tensor, remat, attention, monkeypatch
):
    """The einsum path per shard, or the blockwise kernel in 6-token blocks: blocks that
    straddle a shard's two chunks, rows padded up to whole blocks, unseen blocks skipped."""
    monkeypatch.setitem(blockwise.BLOCK, "tokens", 6)
    devices = jax.devices()[: fsdp * context * tensor]
    mesh = sharding.make_mesh(1, fsdp, tensor, devices=devices, context=context)
    model = tiny_model(checkpoint("llama3.1"), mesh, remat=remat)
    use_attention(model, attention)
    assert_same(loss_and_grads(model, mesh), single_device)


def test_sliding_window_and_cudnn_mask_path_under_context(checkpoint, monkeypatch):
    """Mistral's window through the position mask; attention='cudnn' takes the fused kernel's
    mask path per shard (run here by jax's XLA implementation of the same call)."""
    monkeypatch.setitem(kernels.FUSED_IMPLEMENTATION, "cudnn", None)
    path = checkpoint("mistral")
    expected = loss_and_grads(tiny_model(path), sharding.single_device_mesh())
    mesh = sharding.make_mesh(1, 2, 1, context=4)
    assert_same(loss_and_grads(tiny_model(path, mesh), mesh), expected)
    model = tiny_model(path, mesh)
    use_attention(model, "cudnn")
    assert_same(loss_and_grads(model, mesh), expected)


def test_qlora_under_fsdp_x_context(checkpoint):
    """LoRA adapters on int8-quantized frozen weights (QLoRA), fsdp=2 x context=4."""
    spec = LoRASpec(rank=4, alpha=8.0, quantization=QuantSpec("int8", 32))
    trainable = trainable_filter(spec)
    path = checkpoint("llama3.1")
    expected = loss_and_grads(tiny_model(path, lora=spec), sharding.single_device_mesh(), trainable)
    mesh = sharding.make_mesh(1, 2, 1, context=4)
    assert_same(loss_and_grads(tiny_model(path, mesh, spec), mesh, trainable), expected)


def test_compiled_train_step_with_context_equals_one_device(checkpoint):
    """The real compiled step (build_steps: batch shardings, train and eval) on fsdp x context."""
    batch = packed_batch()
    results = []
    for mesh in (sharding.single_device_mesh(), sharding.make_mesh(1, 2, 1, context=4)):
        model = tiny_model(checkpoint("llama3.1"), mesh)
        state, _ = init_state(model, make_optimizer(train_config())[0], mesh)
        steps = step_builder(model, mesh, len(DOCUMENTS), SEQ_LEN, loss_chunk_size=8)(model)
        on_mesh = sharding.device_batch(batch, steps.batch_shardings)
        eval_sums = jax.device_get(steps.eval(state["params"], on_mesh))
        state, metrics = steps.train(state, on_mesh)
        results.append((jax.device_get(metrics), eval_sums))
    (single, single_eval), (context, context_eval) = results
    for key in ("train/loss", "train/grad_norm", "train/target_tokens"):
        np.testing.assert_allclose(context[key], single[key], rtol=1e-5, err_msg=key)
    np.testing.assert_allclose(context_eval.nll, single_eval.nll, rtol=1e-5)


def test_context_that_does_not_divide_max_length_is_a_config_error():
    config = base.get_config()
    config.mesh.context = 4
    config.data.max_length = 100  # not a multiple of 2 x 4
    with pytest.raises(ConfigError, match=r"data\.max_length=100.*multiple of 8"):
        check_values(RunSpec.of(config), device_count=8, batch_shards=2)
    config.data.max_length = 128
    config.model.attention = "splash"
    with pytest.raises(ConfigError, match=r"model\.attention='splash'.*'blockwise'"):
        check_values(RunSpec.of(config), device_count=8, batch_shards=2)


def test_auto_attention_with_context_leaves_splash_for_blockwise(monkeypatch):
    """On a TPU "auto" would take splash, which cannot take tokens out of order."""
    monkeypatch.setattr(kernel_choice, "accelerator", lambda: "tpu")
    config = base.get_config()
    config.data.max_length = 1024
    shape = from_hf_config(hf_config("llama3.1"))
    assert kernel_choice.attention_for(RunSpec.of(config), shape, 0)[0] == "splash"
    config.mesh.context = 4
    attention, why = kernel_choice.attention_for(RunSpec.of(config), shape, 0)
    assert attention == "blockwise" and "mesh.context" in why


def test_the_planner_keeps_the_context_axis_and_searches_the_rest(checkpoint):
    """config.mesh.context=4 on 8 devices: the planner compiles the step with the sequence
    split (the other axes over the remaining 2 devices), recommends it with its flags, and
    refuses a context size that does not divide the devices or 2 x context the row."""
    config = base.get_config()
    config.model.name_or_path = str(checkpoint("llama3.1"))
    config.model.attention = "blockwise"
    config.data.max_length = SEQ_LEN
    config.train.global_batch_size = 2
    config.mesh.context = 4
    hardware = plan_estimate.Hardware(None, 100e12, 100e9)
    outcome = plan_search.plan(RunSpec.of(config), jax.devices()[:8], hardware, meshes=["1x2x1"],
                               accumulations=[1], remats=["none"])  # fmt: skip
    best = outcome.best.candidate
    assert (best.mesh, best.context) == ("1x2x1 ctx4", 4)
    assert outcome.best.memory_bytes > 0 and "blockwise" in outcome.attention
    assert "--config.mesh.context=4" in best.flags()
    assert plan_search.apply_choice(RunSpec.of(config), best).mesh.context == 4
    for context in (3, 16):  # 3 does not divide 8 devices; 2 x 16 does not divide 64 tokens
        with pytest.raises(ConfigError, match=f"context={context}.*max_length=64"):
            plan_search.context_sizes(RunSpec.of(config), 8, [context])


@pytest.mark.e2e
def test_context_axis_across_two_processes_equals_one_device(checkpoint, single_device, tmp_path):
    """context=4 over 2 processes x 2 CPU devices (jax.distributed on loopback, gloo): keys and
    values gathered across the processes give one device's loss and gradients."""
    with socket.socket() as probe:  # a free port for the coordinator
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = tmp_path / "grads.npz"
    tests = Path(__file__).parents[1]  # the worker imports test modules and configs/ from the repo
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join((str(tests.parent), str(tests))))  # fmt: skip
    script = tests / "context_worker.py"
    procs = [
        subprocess.Popen([sys.executable, str(script), str(checkpoint("llama3.1")), str(i), "2",
                          str(port), str(out)], env=env, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]  # fmt: skip
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    saved = dict(np.load(out))
    flat, structure = jax.tree_util.tree_flatten_with_path(single_device[1])
    grads = jax.tree_util.tree_unflatten(structure, [saved[keystr(p)] for p, _ in flat])
    assert_same((float(saved["loss"]), grads), single_device)
