"""lora.quantize="mxfp4": frozen kernels and experts stored as MXFP4 (models/mxfp4.py). Its codes
and scales equal the MXFP4 quantizer of test_gpt_oss_mxfp4.py; values already MXFP4 (a gpt-oss
checkpoint's experts as they load) are kept exactly, so QLoRA on gpt-oss holds its experts in
their own 4.25 bits per weight with the checkpoint's values."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from test_gpt_oss_mxfp4 import checkpoints, quantize_mxfp4  # noqa: F401 (a fixture)
from test_models import jax_logits, padded_batch

from sft_jax.core.errors import ConfigError
from sft_jax.core.spec import RunSpec
from sft_jax.models import from_pretrained
from sft_jax.models.io import mxfp4 as mxfp4_io
from sft_jax.models.moe import EXPERT_PARAMS, moe_blocks, quantize_experts
from sft_jax.models.quantize import QuantSpec, dequantize, quantize, stored_bytes
from sft_jax.train import sharding
from sft_jax.train.config_check import check_values

MXFP4 = QuantSpec("mxfp4", 32, double_quant=False)


@functools.partial(jax.jit, static_argnums=1)
def _round_trip(kernel: jax.Array, dtype: jnp.dtype) -> tuple[dict, jax.Array]:
    stored = quantize(kernel, MXFP4)
    return stored, dequantize(stored, MXFP4, dtype)


def test_codes_and_scales_equal_the_reference_quantizer():
    """Normal weights over six orders of magnitude: our codes and scale bytes are the test's
    numpy quantizer's (same blocks, transposed layout), and each weight is within half a step
    of its code (at most 2 ** e, between 4 and 6)."""
    rng = np.random.default_rng(0)
    kernel_IxO = rng.standard_normal((128, 24)).astype(np.float32)
    kernel_IxO *= 10.0 ** rng.integers(-4, 2, size=(4, 1, 24)).repeat(32, 0).reshape(128, 24)
    stored, restored = jax.device_get(_round_trip(jnp.asarray(kernel_IxO), jnp.float32))
    blocks, scales = quantize_mxfp4(kernel_IxO[None])  # [1, O, G, 16], [1, O, G]
    np.testing.assert_array_equal(stored["exponents"], scales[0].T)
    codes_IhalfxO = np.moveaxis(blocks[0], 0, -1).reshape(64, 24)
    np.testing.assert_array_equal(stored["codes"], codes_IhalfxO)
    step = np.ldexp(np.float32(1), stored["exponents"].astype(np.int32) - 127)
    assert (np.abs(restored - kernel_IxO) <= np.repeat(step, 32, axis=0)).all()
    assert stored_bytes(stored) == kernel_IxO.size * 17 // 32


def test_mxfp4_values_come_back_exactly():
    """Every code under scales 2 ** -20 .. 2 ** 20, blocks whose largest code is 0.5 to 6:
    MXFP4 values (io/mxfp4.py's dequantization) quantize and dequantize to themselves, in
    float32 and bfloat16."""
    rng = np.random.default_rng(1)
    blocks = rng.integers(0, 256, size=(48, 4, 16), dtype=np.uint8)
    blocks[:8] &= 0x99  # codes 0, 1, 8, 9: 0 and +-0.5 only
    blocks[8:16] &= 0xBB  # codes up to 3 (1.5)
    blocks[16:24] &= 0xDD  # codes up to 5 (3)
    scales = rng.integers(127 - 20, 127 + 21, size=(48, 4), dtype=np.uint8)
    kernel_IxO = mxfp4_io.dequantize(blocks, scales).T  # [4 * 32 inputs, 48 outputs]
    for dtype in (jnp.float32, jnp.bfloat16):
        kernel = jnp.asarray(kernel_IxO, dtype)
        _, restored = _round_trip(kernel, dtype)
        np.testing.assert_array_equal(np.asarray(restored), np.asarray(kernel))


def test_qlora_keeps_the_checkpoint_experts_exactly(checkpoints):  # noqa: F811
    """The tiny gpt-oss loaded from its MXFP4 checkpoint, then its experts stored as MXFP4
    (as the trainer does with lora.quantize="mxfp4"): every expert weight equals the loaded one
    to the bit, the storage takes 17/32 byte per weight, and the logits are unchanged."""
    mxfp4_dir, _ = checkpoints
    model = from_pretrained(mxfp4_dir)
    batch = padded_batch()
    expected_logits = jax_logits(model, batch)
    loaded = [{n: np.asarray(getattr(b, n)[...]) for n in EXPERT_PARAMS} for b in moe_blocks(model)]
    quantize_experts(model, MXFP4, sharding.single_device_mesh())
    for block, weights in zip(moe_blocks(model), loaded, strict=True):
        for name, weight in weights.items():
            assert getattr(block, name) is None  # only the 4-bit storage is held
            np.testing.assert_array_equal(np.asarray(block.expert_weight(name)), weight)
            stored = {k: v[...] for k, v in block.expert_quant[name].items()}
            assert stored_bytes(stored) == weight.size * 17 // 32
    np.testing.assert_array_equal(jax_logits(model, batch), expected_logits)


def test_mxfp4_needs_blocks_of_32():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from configs import base

    config = ml_collections.ConfigDict(base.get_config().to_dict())
    config.lora.rank, config.lora.quantize = 8, "mxfp4"
    check_values(RunSpec.of(_with(config, 32)), 8, 8)
    message = "lora.quantize='mxfp4' has blocks of 32 weights: set it to 32."
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_values(RunSpec.of(_with(config, 64)), 8, 8)


def _with(config: ml_collections.ConfigDict, block: int) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict(config.to_dict())
    config.lora.quant_block_size = block
    return config
