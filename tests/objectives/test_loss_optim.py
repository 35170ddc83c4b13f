"""The loss and the optimizer: chunked == full logits (never all held), z-loss, remat, schedules,
decay mask."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_models import hf_config
from test_step import SEQ_LEN, mean_loss, step_builder, synthetic_batch, train_config

from sft_jax.core.errors import ConfigError
from sft_jax.models import CausalLM, from_hf_config
from sft_jax.objectives.loss import loss_sums
from sft_jax.train.optim import decay_mask, learning_rate_schedule


def model_of(family: str = "llama3.2", **kwargs) -> CausalLM:
    return CausalLM(from_hf_config(hf_config(family)), rngs=nnx.Rngs(0), **kwargs)


def full_logits_sums(model: CausalLM, batch: dict) -> tuple[float, float, float]:
    """The same sums from the whole [B, T, V] logits at once, in float64 numpy."""
    hidden = model.hidden_states(batch["input_ids"], batch["positions"], batch["segment_ids"])
    logits = np.asarray(model.logits(hidden), np.float64)
    peak = logits.max(-1, keepdims=True)
    lse = (peak + np.log(np.exp(logits - peak).sum(-1, keepdims=True)))[..., 0]
    target = np.take_along_axis(logits, batch["target_ids"][..., None], -1)[..., 0]
    mask = batch["target_mask"]
    return float(((lse - target) * mask).sum()), float((lse**2 * mask).sum()), float(mask.sum())


def grads_of(model: CausalLM, batch: dict, max_chunk: int, z_weight: float = 0.0) -> dict:
    loss, params = mean_loss(model, batch, max_chunk, z_weight)
    return jax.jit(jax.grad(loss))(params)


@pytest.mark.parametrize("family", ["llama3.2", "gemma2"])  # gemma2: final soft-capping
def test_chunked_loss_equals_full_logits(family):
    model, batch = model_of(family), synthetic_batch(3)
    expected = full_logits_sums(model, batch)
    for max_chunk in (1, 4, 5, SEQ_LEN):  # 5 -> chunks of 4 (the largest divisor of 16)
        sums = jax.jit(lambda m, b, c=max_chunk: loss_sums(m, b, max_chunk=c))(model, batch)
        np.testing.assert_allclose(
            [float(sums.nll), float(sums.z), float(sums.target_tokens)], expected, rtol=1e-5
        )
    chunked, whole = grads_of(model, batch, 4, z_weight=1e-2), grads_of(model, batch, SEQ_LEN, 1e-2)
    for a, b in zip(jax.tree.leaves(chunked), jax.tree.leaves(whole), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize(
    "family,vocab,mesh_shape",
    [
        ("gemma2", 128, (1, 8, 1)),  # rows over 8 devices; final soft-capping
        ("gemma2", 128, (1, 4, 2)),  # vocabulary split over tensor: vocabulary-parallel
        ("llama3.2", 128, (2, 2, 2)),
        ("llama3.2", 127, (1, 4, 2)),  # a vocabulary tensor cannot split: whole on each device
    ],
)
def test_loss_on_a_mesh_equals_the_loss_on_one_device(family, vocab, mesh_shape):
    """Under a mesh each device computes its rows' loss in shard_map (and its slice of the
    vocabulary where tensor splits it): sums and gradients, z-loss included, are the single
    device's."""
    from sft_jax.train import sharding

    config = dataclasses.replace(from_hf_config(hf_config(family)), vocab_size=vocab)
    model = CausalLM(config, rngs=nnx.Rngs(0))
    batch = synthetic_batch(5, vocab=vocab)
    loss, params = mean_loss(model, batch, max_chunk=4, z_weight=1e-2)
    expected_loss, expected_grads = jax.jit(jax.value_and_grad(loss))(params)
    with jax.set_mesh(sharding.make_mesh(*mesh_shape)):
        got_loss, got_grads = jax.jit(jax.value_and_grad(loss))(params)
        text = jax.jit(loss).trace(params).lower().as_text()
    assert "shard_map" in text or "manual" in text  # the mesh path ran
    np.testing.assert_allclose(got_loss, expected_loss, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(got_grads), jax.tree.leaves(expected_grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_z_loss_pushes_the_log_normalizer_toward_zero():
    model, batch = model_of(), synthetic_batch(4)
    graphdef, params = nnx.split(model, nnx.Param)

    def z_term(params):
        sums = loss_sums(nnx.merge(graphdef, params), batch, max_chunk=4)
        return sums.z / sums.target_tokens

    before = float(z_term(params))
    step = jax.tree.map(lambda p, g: p - 1e-2 * g, params, jax.grad(z_term)(params))
    assert before > 0 and float(z_term(step)) < before


def test_remat_policies_give_the_same_loss_and_gradients():
    batch = synthetic_batch(5)
    reference = grads_of(model_of(), batch, 4)
    for remat in ("full", "save_matmuls"):
        grads = grads_of(model_of(remat=remat), batch, 4)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(reference), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)


def test_bf16_compute_with_fp32_master_weights_stays_close():
    batch = synthetic_batch(6)
    exact = model_of()
    mixed = model_of(dtype=jnp.bfloat16)
    assert mixed.embed[...].dtype == jnp.float32  # master weights stay float32
    nll, _, count = full_logits_sums(exact, batch)
    sums = loss_sums(mixed, batch, max_chunk=4)
    assert float(sums.nll) / float(sums.target_tokens) == pytest.approx(nll / count, rel=2e-2)


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_schedules_warm_up_then_decay_to_the_floor(kind):
    config = train_config(steps=100, warmup_steps=10, learning_rate=1e-3, lr_schedule=kind,
                          min_lr_ratio=0.1)  # fmt: skip
    schedule = learning_rate_schedule(config)
    assert float(schedule(0)) == 0.0
    assert float(schedule(5)) == pytest.approx(5e-4)
    assert float(schedule(10)) == pytest.approx(1e-3)
    final = {"cosine": 1e-4, "linear": 1e-4, "constant": 1e-3}[kind]
    assert float(schedule(100)) == pytest.approx(final, rel=1e-5)
    values = [float(schedule(s)) for s in range(10, 101)]
    assert all(b <= a + 1e-12 for a, b in itertools.pairwise(values))
    if kind == "cosine":  # half way through the decay: halfway between peak and floor
        assert float(schedule(55)) == pytest.approx((1e-3 + 1e-4) / 2, rel=1e-5)


def test_unknown_schedule_is_named():
    with pytest.raises(ConfigError, match=r"config\.train\.lr_schedule='cosin'"):
        learning_rate_schedule(train_config(lr_schedule="cosin"))


def test_weight_decay_skips_norms_and_biases():
    params = nnx.to_flat_state(nnx.state(model_of("llama3.2"), nnx.Param))  # has biases
    mask = dict(nnx.to_flat_state(decay_mask(nnx.state(model_of("llama3.2"), nnx.Param))))
    decayed = {"/".join(map(str, path)) for path, _ in params if mask[path].get_value()}
    kept = {"/".join(map(str, path)) for path, _ in params} - decayed
    assert kept and all(("norm" in name or "bias" in name) for name in kept), kept
    assert any(name.endswith("kernel") for name in decayed) and "embed" in decayed


def test_save_matmuls_recomputes_attention_scores_instead_of_keeping_them():
    """Kept for the backward pass: weight-matmul outputs, never [.., T, S] attention scores
    (at 4096 tokens those are GBs per layer). Without remat the scores are kept."""
    import contextlib
    import io
    import re

    from jax.ad_checkpoint import print_saved_residuals

    batch = synthetic_batch(0)

    def score_shaped(remat: str) -> list[str]:
        graphdef, params = nnx.split(model_of("llama3.1", remat=remat), nnx.Param)
        loss = lambda p: loss_sums(nnx.merge(graphdef, p), batch, max_chunk=4).nll  # noqa: E731
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):  # one "f32[d0,d1,...] source" per residual
            print_saved_residuals(loss, params)
        shapes = re.findall(r"^\w+\[([\d,]*)\]", printed.getvalue(), flags=re.M)
        assert shapes, printed.getvalue()
        return [s for s in shapes if s.endswith(f",{SEQ_LEN},{SEQ_LEN}")]

    assert score_shaped("none")
    assert score_shaped("save_matmuls") == [] and score_shaped("full") == []


@pytest.mark.parametrize("remat", ["none", "save_matmuls"])
def test_bf16_compute_runs_every_backward_matmul_in_bf16(remat):
    """With bf16 compute, only the forward matmuls that keep float32 outputs (LM head logits,
    attention scores) see float32, as outputs; no matmul upcasts its bf16 operands to float32
    (autodiff would, in the backward of those two: float32 matmuls at a fraction of the speed).
    Gradients still match plain autodiff's in float32 compute (the other tests)."""
    import re

    model = model_of(dtype=jnp.bfloat16, remat=remat)
    loss, params = mean_loss(model, synthetic_batch(3), max_chunk=4)
    text = jax.jit(jax.grad(loss)).trace(params).lower().as_text()
    dots = re.findall(r"stablehlo.dot_general.*: \((tensor<[^>]*>), (tensor<[^>]*>)\) -> ", text)
    assert len(dots) > 20
    assert [d for d in dots if "f32" in d[0] or "f32" in d[1]] == []


def test_einsum_f32_gradients_are_plain_autodiffs_in_the_operands_dtype():
    from sft_jax.models.layers import einsum_f32

    rng = np.random.default_rng(0)
    a, b = (jnp.asarray(rng.normal(size=shape), jnp.float32) for shape in ((3, 5, 8), (7, 8)))
    g = jnp.asarray(rng.normal(size=(3, 5, 7)), jnp.float32)
    spec = "BTD,VD->BTV"
    _, ours = jax.vjp(lambda a, b: einsum_f32(spec, a, b), a, b)
    _, plain = jax.vjp(lambda a, b: jnp.einsum(spec, a, b), a, b)
    for x, y in zip(ours(g), plain(g), strict=True):  # float32: the same computation
        np.testing.assert_array_equal(x, y)
    a16, b16 = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)
    out, vjp = jax.vjp(lambda a, b: einsum_f32(spec, a, b), a16, b16)
    assert out.dtype == jnp.float32
    grads = vjp(g)
    assert [x.dtype for x in grads] == [jnp.bfloat16, jnp.bfloat16]
    for x, y in zip(grads, plain(g), strict=True):  # bf16 operands and cotangent: bf16 error
        np.testing.assert_allclose(np.float32(x), y, rtol=0.05, atol=0.05 * float(jnp.abs(y).max()))


def test_the_compiled_train_step_never_holds_full_float32_logits():
    """XLA's memory plan of the real train step (chunked loss, recomputed in the backward
    pass): its temporaries stay below one [B, T, V] float32 logits array. The control, one
    chunk of the whole sequence, plans more than that array, so the measure sees logits."""
    from sft_jax.train import sharding

    config = dataclasses.replace(from_hf_config(hf_config("llama3.2")), vocab_size=65536)
    mesh = sharding.make_mesh(fsdp=-1)
    rows, seq_len = 4 * mesh.size, 256  # four rows per device
    full_logits_bytes = 4 * seq_len * config.vocab_size * 4  # per device: 256 MiB

    def temporaries(chunk: int) -> int:
        model = CausalLM(config, rngs=nnx.Rngs(0))
        plan = step_builder(model, mesh, rows, seq_len, loss_chunk_size=chunk)(model).train_memory
        assert plan is not None and plan.total >= plan.arguments + plan.temporaries
        return plan.temporaries

    chunked, whole = temporaries(16), temporaries(seq_len)
    assert whole > full_logits_bytes, (whole, full_logits_bytes)
    assert chunked < 0.6 * full_logits_bytes, (chunked, full_logits_bytes)


def test_each_device_computes_its_own_rows_and_sums_the_head_gradient_once():
    """The compiled train step on 8 devices (fsdp): every matmul has this device's rows (not
    the global batch's, as when XLA splits activations along the features that fsdp splits the
    weights on), and no collective inside the loss's chunk loop moves a [V, D] head gradient
    (summed once per step, where the loss's shard_map ends)."""
    import re

    from sft_jax.train import sharding

    config = dataclasses.replace(from_hf_config(hf_config("llama3.2")), vocab_size=4096)
    mesh = sharding.make_mesh(data=1, fsdp=8, tensor=1)
    rows, seq_len = 2 * mesh.size, 64
    model = CausalLM(config, rngs=nnx.Rngs(0))
    build = step_builder(model, mesh, rows, seq_len, loss_chunk_size=16)
    captured = []
    compile_ = jax.stages.Lowered.compile

    def keep(lowered, *args, **kwargs):
        captured.append(compile_(lowered, *args, **kwargs))
        return captured[-1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(jax.stages.Lowered, "compile", keep)
        build(model)
    text = captured[0].as_text()  # the train step, as partitioned for one device
    dots = re.findall(r"= f32\[([\d,]+)\]\S* (?:dot|convolution)\(", text)
    assert len(dots) > 20
    global_tokens, local_tokens = rows * seq_len, 2 * seq_len
    for shape in dots:
        dims = [int(d) for d in shape.split(",")]
        assert global_tokens not in dims and dims[0] != rows, shape
    assert any(local_tokens in [int(d) for d in shape.split(",")] for shape in dots)
    collectives = [
        line for line in text.splitlines()
        if re.search(r" (all-reduce|reduce-scatter|all-gather|all-to-all)(-start)?\(", line)
    ]  # fmt: skip
    head = f"[{config.vocab_size},{config.hidden_size}]"
    assert [line for line in collectives if head in line.split("=", 1)[1].split("(")[0]]
    in_loop = [line for line in collectives if "/while/body/" in line]
    assert [line for line in in_loop if str(config.vocab_size) in line.split("(")[0]] == []


def test_bf16_compute_adds_up_the_head_gradient_in_float32_over_chunks_and_devices():
    """With bf16 compute and float32 parameters the head's gradient is a sum over loss chunks
    (and, on a mesh, devices): it adds up in float32, so many small chunks cost no accuracy.
    (Summed in bf16, its error grew with the chunk count: 4x at 64 chunks, 6x on 8 devices.)"""
    from sft_jax.train import sharding

    config = dataclasses.replace(from_hf_config(hf_config("llama3.1")), vocab_size=256)
    rows, seq_len = 8, 256
    ids = np.random.default_rng(0).integers(3, 256, (rows, seq_len + 1)).astype(np.int32)
    batch = {"input_ids": ids[:, :-1], "target_ids": ids[:, 1:],
             "positions": np.tile(np.arange(seq_len, dtype=np.int32), (rows, 1)),
             "segment_ids": np.ones((rows, seq_len), np.int32),
             "target_mask": np.ones((rows, seq_len), bool)}  # fmt: skip

    def head_grad(dtype, chunk: int, mesh=None) -> np.ndarray:
        model = CausalLM(config, rngs=nnx.Rngs(0), dtype=dtype)
        assert model.lm_head is not None  # untied: the head is its own parameter
        loss, params = mean_loss(model, batch, max_chunk=chunk)
        with jax.set_mesh(mesh) if mesh else contextlib.nullcontext():
            grads = jax.jit(jax.grad(loss))(params)
        return np.asarray(grads["lm_head"], np.float64)

    reference = head_grad(jnp.float32, seq_len)
    scale = np.abs(reference).max()
    one_chunk = np.abs(head_grad(jnp.bfloat16, seq_len) - reference).max() / scale
    assert one_chunk < 0.01  # bf16 compute's own error
    for mesh in (None, sharding.make_mesh(data=1, fsdp=8, tensor=1)):
        error = np.abs(head_grad(jnp.bfloat16, 4, mesh) - reference).max() / scale  # 64 chunks
        assert error < 1.5 * one_chunk, (error, one_chunk)
