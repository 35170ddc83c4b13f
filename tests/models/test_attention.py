"""The fused-attention paths (config.model.attention="cudnn" / "splash") against the einsum
reference.

"cudnn" has two forms. With a bound on segments per row (ModelConfig.max_segments, set from
config.data.max_documents_per_row) on Hopper GPUs it hands cuDNN a table of segments per row
(its packed layout); otherwise a [B, 1, T, S] mask through jax.nn.dot_product_attention. On CPU
the mask form runs that function's XLA implementation, and the packed form an emulation of the
kernel's documented contract that sees only the table, so everything of ours around the kernel
is checked: head grouping, scale, the table, masks, sharding. The cuDNN kernel itself needs an
NVIDIA GPU (benchmarks/gpu_check.sh runs the GPU tests below there).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_models import hf_config
from test_step import mean_loss, synthetic_batch

from sft_jax.core.spec import RunSpec
from sft_jax.models import CausalLM, UnsupportedModelError, from_hf_config
from sft_jax.models.kernels import fused as kernels


def model_pair(family: str, max_segments: int = 0) -> tuple[CausalLM, CausalLM]:
    config = from_hf_config(hf_config(family))
    reference = CausalLM(config, rngs=nnx.Rngs(0))
    fused_config = dataclasses.replace(config, attention="cudnn", max_segments=max_segments)
    return reference, CausalLM(fused_config, rngs=nnx.Rngs(0))


def emulated_packed_kernel(
    query, key, value, *, q_seqlen, kv_seqlen, q_offsets, kv_offsets, scale,
    sliding_window_length,
):  # fmt: skip
    """cuDNN's packed causal attention as jax documents it, from the segment table alone:
    segment m of row b is tokens [offsets[b, m], offsets[b, m] + seqlen[b, m]), each attends
    causally (and within the window) inside its own segment; -1 entries are absent."""
    assert q_seqlen is kv_seqlen and q_offsets is kv_offsets  # self-attention: one table
    seq_len = query.shape[1]
    index_T = jnp.arange(seq_len)
    index_1x1xT = index_T[None, None, :]
    starts_BxM = q_offsets[:, :-1]
    inside_BxMxT = (
        (q_seqlen[:, :, None] >= 0)
        & (index_1x1xT >= starts_BxM[:, :, None])
        & (index_1x1xT < (starts_BxM + q_seqlen)[:, :, None])
    )
    label_BxT = jnp.where(inside_BxMxT.any(1), jnp.argmax(inside_BxMxT, axis=1), -1)
    mask_BxTxS = (label_BxT[:, :, None] == label_BxT[:, None, :]) & (label_BxT[:, :, None] >= 0)
    distance_1xTxS = (index_T[:, None] - index_T[None, :])[None]
    mask_BxTxS &= distance_1xTxS >= 0
    if sliding_window_length is not None:
        mask_BxTxS &= distance_1xTxS < sliding_window_length
    out = jax.nn.dot_product_attention(
        query, key, value, mask=mask_BxTxS[:, None], scale=scale, implementation="xla"
    )
    # Tokens of no segment are never written by the kernel: garbage, here NaN.
    return jnp.where((label_BxT >= 0)[:, :, None, None], out, jnp.nan)


def loss_and_grads(model: CausalLM, batch: dict) -> tuple[float, dict]:
    loss, params = mean_loss(model, batch, max_chunk=8)
    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    return float(value), nnx.to_pure_dict(grads)


def assert_grads_close(grads: dict, expected: dict, rtol: float) -> None:
    for (path, g), e in zip(
        jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(expected), strict=True
    ):
        np.testing.assert_allclose(g, e, rtol=rtol, atol=1e-6, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("family", ["llama3.1", "llama3.2", "mistral", "qwen3", "gemma3"])
def test_fused_attention_equals_the_einsum_path(family, monkeypatch):
    monkeypatch.setitem(kernels.FUSED_IMPLEMENTATION, "cudnn", None)  # jax's XLA kernel on CPU
    reference, fused = model_pair(family)
    batch = synthetic_batch(7)  # two packed documents per row, padding, windows shorter
    expected_loss, expected_grads = loss_and_grads(reference, batch)
    loss, grads = loss_and_grads(fused, batch)
    assert loss == pytest.approx(expected_loss, rel=1e-6)
    assert_grads_close(grads, expected_grads, rtol=1e-4)


@pytest.mark.parametrize("key_heads", [True, False], ids=["jax_gqa_offsets", "old_jax"])
@pytest.mark.parametrize("family", ["llama3.1", "mistral", "qwen2", "gemma3"])
def test_cudnn_packed_layout_equals_the_einsum_path(family, key_heads, monkeypatch):
    """The segment-table form of "cudnn": two documents and padding per row, windows shorter
    than the documents (mistral, qwen2, gemma3), GQA: kernel-side (a jax that places key
    segments by the key's heads) or by repeated key/value heads (an older jax)."""
    monkeypatch.setitem(kernels.PACKED_KERNEL, "fn", emulated_packed_kernel)
    monkeypatch.setattr(kernels, "_kv_offsets_use_key_heads", lambda: key_heads)
    reference, fused = model_pair(family, max_segments=4)
    batch = synthetic_batch(7)
    expected_loss, expected_grads = loss_and_grads(reference, batch)
    loss, grads = loss_and_grads(fused, batch)
    assert loss == pytest.approx(expected_loss, rel=1e-6)
    assert_grads_close(grads, expected_grads, rtol=1e-4)


def test_segment_table_lists_every_run_and_flags_rows_with_too_many():
    segment_ids = np.array(
        [
            [1, 1, 1, 2, 2, 3, 0, 0],  # three documents, then padding
            [1, 1, 1, 1, 1, 1, 1, 1],  # one document fills the row
            [0, 0, 0, 0, 0, 0, 0, 0],  # an empty row (the last eval batch pads with these)
            [1, 2, 3, 4, 5, 6, 7, 0],  # more segments than the table holds
        ],
        np.int32,
    )
    lengths, starts, fits = jax.device_get(kernels.segment_table(jnp.asarray(segment_ids), 4))
    np.testing.assert_array_equal(
        lengths, [[3, 2, 1, 2], [8, -1, -1, -1], [8, -1, -1, -1], [1, 1, 1, 1]]
    )
    np.testing.assert_array_equal(
        starts,
        [[0, 3, 5, 6, -1], [0, -1, -1, -1, -1], [0, -1, -1, -1, -1], [0, 1, 2, 3, -1]],
    )
    np.testing.assert_array_equal(fits, [True, True, True, False])


def test_rows_with_more_segments_than_the_table_give_nan_not_leakage(monkeypatch):
    monkeypatch.setitem(kernels.PACKED_KERNEL, "fn", emulated_packed_kernel)
    _, fused = model_pair("llama3.1", max_segments=2)  # two documents + padding need 3
    batch = synthetic_batch(7)
    logits = fused(batch["input_ids"], batch["positions"], batch["segment_ids"])
    assert np.isnan(np.asarray(logits)).all()


LOWERED = {  # cuDNN's custom calls and mask type for each form of attention="cudnn"
    "packed": ("__cudnn$fmhaSoftmax", "PADDING_CAUSAL"),
    "mask": ("__cudnn$fmhaScaleBiasSoftmax", "CAUSAL"),
}


@pytest.mark.parametrize("remat", ["none", "save_matmuls"])
@pytest.mark.parametrize("layout", ["packed", "mask"])
def test_cudnn_attention_lowers_for_cuda(layout, remat, monkeypatch):
    """Both forms of "cudnn" through jax's own bindings, lowered for CUDA on this CPU (with
    jax's GPU checks answered): forward and backward cuDNN calls of every layer, causal (within
    segments, or with the mask as a bias), the window and the table size in their configs.
    Running the kernel needs a GPU (the GPU test below)."""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn

    monkeypatch.setattr(cudnn, "check_cudnn_version", lambda: 91000)
    monkeypatch.setattr(cudnn, "check_compute_capability", lambda capability: True)
    monkeypatch.setattr(kernels, "packed_cudnn_supported", lambda: layout == "packed")
    config = from_hf_config(hf_config("mistral"))
    model = CausalLM(dataclasses.replace(config, attention="cudnn", max_segments=3),
                     dtype=jnp.bfloat16, remat=remat, rngs=nnx.Rngs(0))  # fmt: skip
    loss, params = mean_loss(model, synthetic_batch(7), max_chunk=8)
    lowered = jax.jit(jax.grad(loss)).trace(params).lower(lowering_platforms=("cuda",))
    text = lowered.as_text().replace("\\22", '"')
    name, mask_type = LOWERED[layout]
    calls = [text.count(f"custom_call @{name}{part}(") for part in ("", "Backward")]
    assert calls == [config.num_layers * (2 if remat == "save_matmuls" else 1), config.num_layers]
    assert text.count(f'"mask_type": "{mask_type}"') == sum(calls)
    assert text.count(f'"sliding_window_length": {config.sliding_window}') == sum(calls)
    assert text.count('"max_seg_per_batch": 3') == (sum(calls) if layout == "packed" else 0)


def test_segment_starts_reach_cudnn_at_each_tensors_own_stride():
    """jax turns our table into element offsets into the flattened batch, by each tensor's
    per-token stride (jax-ml/jax#39521: older jax took the query's for keys too, which under
    GQA read other tokens' keys). Checked on jax's conversion itself, with what we hand it."""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn

    seen = {}

    def spy(query, key, value, **table):
        seen.update(table, query=query, key=key)
        return emulated_packed_kernel(query, key, value, **table)

    batch, seq_len, kv_heads, groups, head_dim = 3, 16, 2, 4, 8
    segment_ids = np.array([[1] * 5 + [2] * 7 + [0] * 4, [1] * 16, [1] * 3 + [2] * 3 + [3] * 10])
    q = jnp.ones((batch, seq_len, kv_heads, groups, head_dim), jnp.bfloat16)
    k = jnp.ones((batch, seq_len, kv_heads, head_dim), jnp.bfloat16)
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(kernels.PACKED_KERNEL, "fn", spy)
        kernels.cudnn_packed_attention(q, k, k, jnp.asarray(segment_ids), 0.3, None, 4)
    _, _, q_offsets, kv_offsets = cudnn._fix_seqlen_offsets(
        seen["q_seqlen"], seen["kv_seqlen"], seen["q_offsets"], seen["kv_offsets"],
        seen["query"], seen["key"],
    )  # fmt: skip
    starts = [r * seq_len + t for r, row in enumerate(segment_ids) for t in range(seq_len)
              if t == 0 or row[t] != row[t - 1]]  # fmt: skip
    for offsets, tensor in ((q_offsets, seen["query"]), (kv_offsets, seen["key"])):
        stride = tensor.shape[2] * tensor.shape[3]
        np.testing.assert_array_equal(np.asarray(offsets).reshape(-1)[: len(starts)] // stride,
                                      starts)  # fmt: skip
        assert not np.any(np.asarray(offsets).reshape(-1)[: len(starts)] % stride)


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
    reason="needs an NVIDIA GPU: JAX_PLATFORMS=cuda pytest tests/models/test_attention.py",
)
@pytest.mark.parametrize("layout", ["packed", "mask"])
@pytest.mark.parametrize("family", ["llama3.1", "mistral", "qwen3", "gemma3"])
def test_cudnn_kernel_is_as_close_to_float32_as_bf16_einsums(family, layout):
    """On a GPU: the real cuDNN kernel (bf16, as it requires) against float32 einsums; its
    loss and gradient errors must be those of bf16 einsum attention, not larger. "packed" is
    the segment table (Hopper and later), "mask" the [B, 1, T, S] mask."""
    if layout == "packed" and not kernels.packed_cudnn_supported():
        pytest.skip("cuDNN's packed layout needs a Hopper GPU and a jax that binds it")
    config = from_hf_config(hf_config(family))
    exact = CausalLM(config, rngs=nnx.Rngs(0))
    einsum = CausalLM(config, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    fused_config = dataclasses.replace(
        config, attention="cudnn", max_segments=4 if layout == "packed" else 0
    )
    cudnn = CausalLM(fused_config, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
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
    monkeypatch.setitem(kernels.SPLASH_INTERPRET, "interpret", True)
    config = from_hf_config(hf_config(family))
    reference = CausalLM(config, rngs=nnx.Rngs(0))
    splash = CausalLM(dataclasses.replace(config, attention="splash"), rngs=nnx.Rngs(0))
    batch = long_batch(3)
    expected_loss, expected_grads = loss_and_grads(reference, batch)
    loss, grads = loss_and_grads(splash, batch)
    assert loss == pytest.approx(expected_loss, rel=1e-5)
    assert_grads_close(grads, expected_grads, rtol=1e-3)


@pytest.mark.parametrize("kind", ["splash", "cudnn"])
def test_kernels_on_a_sharded_mesh_train_like_the_einsum_path(kind, monkeypatch):
    """Train steps on fsdp=4 x tensor=2: the kernel runs per shard (rows and kv heads split);
    "cudnn" in its packed form, whose segment table each shard builds for its own rows."""
    from test_step import train_config

    from sft_jax.train import sharding
    from sft_jax.train.compiled import build_steps, init_state
    from sft_jax.train.optim import make_optimizer
    from sft_jax.train.sharding import device_batch
    from sft_jax.train.step import StepOptions

    monkeypatch.setitem(kernels.SPLASH_INTERPRET, "interpret", True)
    monkeypatch.setitem(kernels.PACKED_KERNEL, "fn", emulated_packed_kernel)
    mesh = sharding.make_mesh(data=1, fsdp=4, tensor=2)
    config = from_hf_config(hf_config("llama3.1"))
    batches = [long_batch(seed, rows=4) for seed in (5, 6)]
    curves = {}
    for name in ("xla", kind):
        model_config = dataclasses.replace(config, attention=name, max_segments=4)
        model = CausalLM(model_config, rngs=nnx.Rngs(0))
        tx, schedule = make_optimizer(train_config())
        state, shardings = init_state(model, tx, mesh)
        steps = build_steps(model, tx, schedule, mesh, shardings, train_rows=4, eval_rows=4,
                            seq_len=128, options=StepOptions(loss_chunk_size=32))  # fmt: skip
        curves[name] = []
        for batch in batches:
            state, metrics = steps.train(state, device_batch(batch, steps.batch_shardings))
            curves[name].append([float(metrics["train/loss"]), float(metrics["train/grad_norm"])])
    np.testing.assert_allclose(curves[kind], curves["xla"], rtol=1e-4)


def test_kernels_the_backend_lacks_are_config_errors(monkeypatch):
    from configs import base
    from sft_jax.core.errors import ConfigError
    from sft_jax.models.io.hf import load_hf_config, resolve_model_dir
    from sft_jax.train.kernel_choice import attention_for

    config = base.get_config()
    model = from_hf_config(load_hf_config(resolve_model_dir(config.model.name_or_path)))
    for kind, needs in (("splash", "not a TPU"), ("cudnn", "not an NVIDIA GPU")):
        config.model.attention = kind
        with pytest.raises(ConfigError, match=needs):
            attention_for(RunSpec.of(config), model, max_segments=0)
    monkeypatch.setitem(kernels.SPLASH_INTERPRET, "interpret", True)
    config.model.attention = "splash"
    config.data.max_length = 100
    with pytest.raises(ConfigError, match="is not a multiple of its 128-token tile"):
        attention_for(RunSpec.of(config), model, max_segments=0)


@pytest.mark.parametrize(
    ("family", "accelerator", "compute_dtype", "max_length", "expected", "why"),
    [
        ("llama3.1", "nvidia", "bfloat16", 4096, "cudnn", "cuDNN attention on this NVIDIA"),
        ("qwen3", "nvidia", "bfloat16", 1000, "cudnn", "cuDNN"),
        ("gemma2", "nvidia", "bfloat16", 4096, "xla", "soft-caps attention logits"),
        ("llama3.1", "nvidia", "float32", 4096, "xla", "compute_dtype='float32'"),
        ("gemma2", "tpu", "bfloat16", 4096, "splash", "splash attention on this TPU"),
        ("llama3.1", "tpu", "float32", 4096, "splash", "splash"),
        ("llama3.1", "tpu", "bfloat16", 1000, "xla", "max_length=1000 is not a multiple"),
        ("llama3.1", "cpu", "float32", 128, "xla", "no fused kernel on cpu"),
        ("llama3.1", "rocm", "bfloat16", 4096, "xla", "no fused kernel on rocm"),
    ],
)
def test_auto_attention_takes_the_accelerators_kernel_where_the_model_allows(
    family, accelerator, compute_dtype, max_length, expected, why
):
    from sft_jax.train.kernel_choice import choose_attention

    kind, reason = choose_attention(
        "auto", accelerator=accelerator, model=from_hf_config(hf_config(family)),
        compute_dtype=compute_dtype, max_length=max_length,
    )  # fmt: skip
    assert kind == expected
    assert why in reason


def test_a_named_kernel_the_run_cannot_use_says_why():
    from sft_jax.core.errors import ConfigError
    from sft_jax.train.kernel_choice import choose_attention

    llama, gemma2 = from_hf_config(hf_config("llama3.1")), from_hf_config(hf_config("gemma2"))
    nvidia = {"accelerator": "nvidia", "max_length": 4096}
    with pytest.raises(ConfigError, match=r"compute_dtype='float32' \(cuDNN takes bfloat16"):
        choose_attention("cudnn", model=llama, compute_dtype="float32", **nvidia)
    with pytest.raises(ConfigError, match="gemma2 soft-caps attention logits"):
        choose_attention("cudnn", model=gemma2, compute_dtype="bfloat16", **nvidia)
    with pytest.raises(ConfigError, match="attention='flash': expected one of auto, xla"):
        choose_attention("flash", model=llama, compute_dtype="bfloat16", **nvidia)
    kind, _ = choose_attention("xla", model=gemma2, compute_dtype="bfloat16", **nvidia)
    assert kind == "xla"
    # cuDNN takes head dims up to 256 on Hopper, 128 before: "auto" falls back, "cudnn" says so.
    wide = dataclasses.replace(llama, head_dim=256)
    hopper, ampere = {"max_head_dim": 256}, {"max_head_dim": 128}
    assert (
        choose_attention("auto", model=wide, compute_dtype="bfloat16", **nvidia, **hopper)[0]
        == "cudnn"
    )
    kind, why = choose_attention("auto", model=wide, compute_dtype="bfloat16", **nvidia, **ampere)
    assert kind == "xla" and "head_dim 256 is not a multiple of 8 up to 128" in why
    with pytest.raises(ConfigError, match="head_dim 256"):
        choose_attention("cudnn", model=wide, compute_dtype="bfloat16", **nvidia, **ampere)
