"""gpt-oss's MXFP4 experts (the hub checkpoints' format), dequantized as they load.

The tiny gpt-oss's expert weights are quantized here by a quantizer of our own following the
format (FP4 E2M1 codes two per byte, low nibble first, one E8M0 scale per 32 inputs), saved
with config.json's mxfp4 quantization_config. References: transformers' own dequantization
(transformers.integrations.mxfp4.convert_moe_packed_tensors) of those same blocks and scales,
saved as a float checkpoint, and transformers loading the MXFP4 checkpoint on CPU with
Mxfp4Config(dequantize=True)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.torch import load_file, save_file
from test_models import assert_close_on_tokens, padded_batch
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from sft_jax.core.errors import CheckpointError
from sft_jax.models import UnsupportedModelError, from_pretrained, save_pretrained
from sft_jax.models.io import mxfp4
from sft_jax.models.io.safetensors import TensorEntry
from sft_jax.train import sharding

# One compiled forward for every model of the same structure (the float and MXFP4 loads).
_forward = nnx.jit(lambda model, ids, positions, segments: model(ids, positions, segments))


def jax_logits(model, batch: dict[str, np.ndarray]) -> np.ndarray:
    return np.asarray(_forward(model, batch["input_ids"], batch["positions"], batch["segment_ids"]))


_MAGNITUDES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], np.float32)
ASSETS = Path(__file__).resolve().parents[2] / "assets" / "model_configs"
_EXPERT_SUFFIXES = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


def quantize_mxfp4(weight_XxIxO: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(blocks [X, O, I/32, 16], scales [X, O, I/32]) of a weight [X, I, O]: each block of 32
    inputs scaled by the least power of two that brings its largest |value| within 6, each
    value rounded to the nearest FP4 magnitude, its sign in bit 3; value 2b in byte b's low
    nibble, 2b + 1 in its high nibble."""
    weight_XxOxI = np.swapaxes(weight_XxIxO, 1, 2).astype(np.float32)
    experts, outputs, inputs = weight_XxOxI.shape
    groups = weight_XxOxI.reshape(experts, outputs, inputs // 32, 32)
    largest = np.maximum(np.abs(groups).max(axis=-1), np.float32(2.0**-120))
    exponents = np.ceil(np.log2(largest / 6.0)).astype(np.int32)
    scaled = groups / np.ldexp(np.float32(1.0), exponents)[..., None]
    codes = np.abs(np.abs(scaled)[..., None] - _MAGNITUDES).argmin(axis=-1).astype(np.uint8)
    codes |= np.signbit(scaled).astype(np.uint8) << 3
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return np.ascontiguousarray(blocks), np.ascontiguousarray(exponents + 127, np.uint8)


def _write(directory, tensors: dict[str, torch.Tensor], config: dict) -> None:
    directory.mkdir()
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def checkpoints(hf_checkpoint, tmp_path_factory):
    """(MXFP4 directory, float directory of transformers' dequantization of the same blocks)."""
    path, _ = hf_checkpoint("gpt_oss")
    tensors = load_file(path / "model.safetensors")
    config = json.loads((path / "config.json").read_text())
    quantized, dequantized = {}, {}
    for name, tensor in tensors.items():
        if not name.endswith(_EXPERT_SUFFIXES):
            quantized[name] = dequantized[name] = tensor
            continue
        blocks, scales = (torch.from_numpy(a) for a in quantize_mxfp4(tensor.float().numpy()))
        quantized[f"{name}_blocks"], quantized[f"{name}_scales"] = blocks, scales
        dequantized[name] = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
    root = tmp_path_factory.mktemp("gpt_oss_mxfp4")
    mxfp4_config = {"quant_method": "mxfp4", "modules_to_not_convert": None}
    _write(root / "mxfp4", quantized, {**config, "quantization_config": mxfp4_config})
    _write(root / "float", dequantized, config)
    return root / "mxfp4", root / "float"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_equals_transformers_on_every_code_and_scale(dtype):
    """Every byte (both nibbles) under every scale byte 0..254, to the bit, in float32 and
    bfloat16 (E8M0's 255, NaN, is refused by the loader)."""
    rng = np.random.default_rng(0)
    blocks = np.tile(np.arange(256, dtype=np.uint8), (3, 255, 1)).reshape(3, 255, 16, 16)
    blocks = rng.permuted(blocks, axis=-1)
    scales = np.tile(np.arange(255, dtype=np.uint8)[:, None], (3, 1, 16))
    expected = convert_moe_packed_tensors(
        torch.from_numpy(blocks), torch.from_numpy(scales), dtype=dtype
    )
    ours_OxI = mxfp4.dequantize(blocks, scales)
    ours_dtype = np.float32 if dtype == torch.float32 else ml_dtypes.bfloat16
    ours = np.ascontiguousarray(np.swapaxes(ours_OxI, 1, 2).astype(ours_dtype))
    expected = expected.float().numpy().astype(ours_dtype)
    assert ours.shape == expected.shape == (3, 16 * 32, 255)
    np.testing.assert_array_equal(ours.view(np.uint8), expected.view(np.uint8))


def _params(model) -> dict[str, np.ndarray]:
    return {
        "/".join(map(str, path)): np.asarray(variable.get_value())
        for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }


def test_loaded_weights_and_logits_equal_transformers_dequantization(checkpoints):
    """Loaded in float32, every parameter equals the float checkpoint's (transformers'
    dequantization) to the bit, so do the logits; transformers' own MXFP4 load
    (Mxfp4Config(dequantize=True), CPU) gives the same logits."""
    mxfp4_dir, float_dir = checkpoints
    ours = from_pretrained(mxfp4_dir)
    reference = from_pretrained(float_dir)
    ours_params, reference_params = _params(ours), _params(reference)
    assert ours_params.keys() == reference_params.keys()
    for name, value in ours_params.items():
        np.testing.assert_array_equal(value, reference_params[name], err_msg=name)
    batch = padded_batch()
    logits = jax_logits(ours, batch)
    np.testing.assert_array_equal(logits, jax_logits(reference, batch))
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        mxfp4_dir,
        quantization_config=transformers.Mxfp4Config(dequantize=True),
        dtype=torch.float32,
        attn_implementation="eager",
    ).eval()
    with torch.no_grad():
        expected = hf_model(
            input_ids=torch.as_tensor(batch["input_ids"], dtype=torch.long),
            attention_mask=torch.as_tensor(batch["attention_mask"]),
        ).logits.numpy()
    assert_close_on_tokens(logits, expected, batch["attention_mask"], rel_tol=1e-5)


def test_bfloat16_experts_equal_transformers_bfloat16_dequantization(checkpoints):
    """param_dtype bfloat16: each expert weight equals transformers' dequantization to
    bfloat16 of the same blocks (gate and up split from its interleaved gate_up_proj)."""
    mxfp4_dir, _ = checkpoints
    model = from_pretrained(mxfp4_dir, param_dtype=jax.numpy.bfloat16)
    tensors = load_file(mxfp4_dir / "model.safetensors")

    def transformers_bf16(name: str) -> np.ndarray:
        blocks, scales = tensors[f"{name}_blocks"], tensors[f"{name}_scales"]
        dequantized = convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16)
        return dequantized.float().numpy().astype(ml_dtypes.bfloat16)

    for index, layer in enumerate(model.layers):
        prefix = f"model.layers.{index}.mlp.experts"
        gate_up = transformers_bf16(f"{prefix}.gate_up_proj")
        expected = {
            "experts_gate": gate_up[..., 0::2],
            "experts_up": gate_up[..., 1::2],
            "experts_down": transformers_bf16(f"{prefix}.down_proj"),
        }
        for name, value in expected.items():
            ours = np.asarray(getattr(layer.mlp, name)[...])
            assert ours.dtype == value.dtype
            np.testing.assert_array_equal(ours.view(np.uint16), value.view(np.uint16))


def test_sharded_load_equals_one_device(checkpoints):
    """fsdp=2 x tensor=2 x expert=2: each device dequantizes only its slice (the down
    projection's 32 inputs split in two halves of a block); every parameter equals the
    single-device load."""
    mxfp4_dir, _ = checkpoints
    mesh = sharding.make_mesh(fsdp=2, tensor=2, expert=2)
    sharded = from_pretrained(mxfp4_dir, mesh=mesh)
    down = sharded.layers[0].mlp.experts_down[...]
    assert down.sharding.spec == jax.sharding.PartitionSpec("expert", "tensor", "fsdp")
    expected = _params(from_pretrained(mxfp4_dir))
    for name, value in _params(sharded).items():
        np.testing.assert_array_equal(value, expected[name], err_msg=name)


def test_export_writes_float_experts_without_quantization_config(checkpoints, tmp_path):
    """The export holds the dequantized experts (byte-equal to transformers' dequantization)
    and no quantization_config; transformers loads it as a plain checkpoint."""
    mxfp4_dir, float_dir = checkpoints
    save_pretrained(from_pretrained(mxfp4_dir), tmp_path)
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())
    exported = load_file(tmp_path / "model.safetensors")
    reference = load_file(float_dir / "model.safetensors")
    assert exported.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.equal(exported[name], tensor), name
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert getattr(hf_model.config, "quantization_config", None) is None


def _edited_copy(source, target, edit) -> None:
    shutil.copytree(source, target)
    tensors = load_file(source / "model.safetensors")
    edit(tensors)
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})


def _quantize_q_proj(tensors: dict) -> None:
    name = "model.layers.0.self_attn.q_proj.weight"
    blocks, scales = quantize_mxfp4(tensors.pop(name).T[None].float().numpy())
    tensors[f"{name}_blocks"] = torch.from_numpy(blocks)
    tensors[f"{name}_scales"] = torch.from_numpy(scales)


def _nan_scale(tensors: dict) -> None:
    tensors["model.layers.1.mlp.experts.down_proj_scales"][2, 5, 0] = 255


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_quantize_q_proj, r"q_proj\.weight_blocks is an MXFP4 tensor outside gpt-oss's experts"),
        (
            lambda t: t.pop("model.layers.2.mlp.experts.gate_up_proj_scales"),
            r"gate_up_proj_blocks has no model\.layers\.2\.mlp\.experts\.gate_up_proj_scales",
        ),
        (_nan_scale, r"down_proj_scales of expert 2 holds the E8M0 NaN scale"),
    ],
)
def test_what_is_not_mxfp4_experts_is_refused(checkpoints, tmp_path, edit, message):
    mxfp4_dir, _ = checkpoints
    _edited_copy(mxfp4_dir, tmp_path / "edited", edit)
    with pytest.raises(CheckpointError, match=message):
        from_pretrained(tmp_path / "edited")


@pytest.mark.parametrize(("model_type", "quant_method"), [("gpt_oss", "fp8"), ("llama", "mxfp4")])
def test_other_quantization_is_refused_from_the_config(tmp_path, model_type, quant_method):
    config = transformers.AutoConfig.for_model(
        model_type, num_hidden_layers=1, quantization_config={"quant_method": quant_method}
    )
    config.save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match=rf"quant_method '{quant_method}'"):
        from_pretrained(tmp_path)


def test_the_hub_20b_tensors_read_as_its_expert_layout():
    """openai/gpt-oss-20b's MXFP4 tensors, with the shapes its safetensors headers give them
    (uint8 gate_up_proj_blocks [32, 5760, 90, 16] and _scales [32, 5760, 90], down_proj_blocks
    [32, 2880, 90, 16] and _scales [32, 2880, 90]), read as the experts of its config.json
    (assets/model_configs/gpt_oss_20b): gate_up_proj [X, D, 2F], down_proj [X, F, D]."""
    hf = transformers.AutoConfig.from_pretrained(ASSETS / "gpt_oss_20b")
    experts, width, hidden = hf.num_local_experts, hf.intermediate_size, hf.hidden_size
    prefix = "model.layers.0.mlp.experts"
    shapes = {
        f"{prefix}.gate_up_proj_blocks": (32, 5760, 90, 16),
        f"{prefix}.gate_up_proj_scales": (32, 5760, 90),
        f"{prefix}.down_proj_blocks": (32, 2880, 90, 16),
        f"{prefix}.down_proj_scales": (32, 2880, 90),
    }
    headers = {
        name: TensorEntry(Path("model-00000-of-00002.safetensors"), np.dtype(np.uint8), shape, 0)
        for name, shape in shapes.items()
    }
    entries = mxfp4.dequantized_entries(headers, np.dtype(ml_dtypes.bfloat16))
    assert sorted(entries) == [f"{prefix}.down_proj", f"{prefix}.gate_up_proj"]
    assert entries[f"{prefix}.gate_up_proj"].shape == (experts, hidden, 2 * width)
    assert entries[f"{prefix}.down_proj"].shape == (experts, width, hidden)
