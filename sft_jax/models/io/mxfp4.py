"""MXFP4 experts (the hub's gpt-oss checkpoints), dequantized as they load.

The checkpoint stores each fused expert tensor `W` of transformers' layout [X, I, O]
(gate_up_proj [X, D, 2F], down_proj [X, F, D]) as two uint8 tensors over its transpose
[X, O, I], the input dimension cut into G = I / 32 blocks of 32 values:

  mlp.experts.<proj>_blocks  [X, O, G, 16]  two 4-bit FP4 (E2M1) codes per byte: value 2b in
                                            the low nibble of byte b, value 2b + 1 in the high
  mlp.experts.<proj>_scales  [X, O, G]      one E8M0 exponent per block, biased by 127

  W[x, 32 g + j, o] = FP4_E2M1[code(x, o, g, j)] * 2 ** (scales[x, o, g] - 127)

(transformers.integrations.mxfp4.convert_moe_packed_tensors reads it so). A code's bit 3 is
its sign, bits 0-2 index the magnitudes below. The product is exact in float32; it is then
rounded once to the parameter dtype, as transformers rounds it.

`dequantized_entries` puts one `Mxfp4Entry` in place of each blocks/scales pair: it reads any
box of W, dequantizing only the blocks that box covers, one expert at a time, so the loader
reads MXFP4 experts slice by slice as it reads every other tensor.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np

from sft_jax.core.errors import CheckpointError
from sft_jax.models.io.safetensors import TensorEntry
from sft_jax.models.mxfp4 import BLOCK_VALUES, FP4_E2M1, SCALE_BIAS

SCALE_NAN = 255  # E8M0's NaN: no weight of a real checkpoint has it
_EXPERT_TENSOR = re.compile(r"model\.layers\.\d+\.mlp\.experts\.(gate_up_proj|down_proj)$")
_SUFFIXES = ("_blocks", "_scales")


# Both values of every byte (low nibble first), and 2 ** (s - 127) of every scale byte: exact
# float32 (2 ** -127 is a denormal, which numpy keeps; 255 gives inf, as in transformers).
_BYTE_VALUES = np.stack([FP4_E2M1[np.arange(256) & 0x0F], FP4_E2M1[np.arange(256) >> 4]], axis=-1)
with np.errstate(over="ignore"):
    _SCALES = np.ldexp(np.float32(1), np.arange(256) - SCALE_BIAS).astype(np.float32)


def dequantize(blocks_xGxB: np.ndarray, scales_xG: np.ndarray) -> np.ndarray:
    """float32 values [..., G * 32] of blocks [..., G, 16] (uint8) and scales [..., G]."""
    values = _BYTE_VALUES[blocks_xGxB].reshape(*scales_xG.shape, BLOCK_VALUES)
    with np.errstate(over="ignore", invalid="ignore"):  # 6 * 2 ** 127 is inf, as in transformers
        values *= _SCALES[scales_xG][..., None]
    return values.reshape(*scales_xG.shape[:-1], -1)


@dataclasses.dataclass(frozen=True)
class Mxfp4Entry:
    """An expert tensor W [X, I, O] held as MXFP4 blocks and scales; reads like a TensorEntry,
    in `dtype`."""

    name: str
    blocks: TensorEntry  # [X, O, G, 16]
    scales: TensorEntry  # [X, O, G]
    dtype: np.dtype

    @property
    def path(self) -> Path:
        return self.blocks.path

    @property
    def shape(self) -> tuple[int, ...]:
        experts, outputs, groups = self.scales.shape
        return experts, groups * BLOCK_VALUES, outputs

    def read(self, index: tuple[slice, ...] | None = None) -> np.ndarray:
        """W[index] in self.dtype: the blocks covering the box, dequantized one expert at a
        time (float32 for one expert's box at most)."""
        index = (*(index or ()), *(slice(None),) * (3 - len(index or ())))
        experts, inputs, outputs = (range(n)[i] for i, n in zip(index, self.shape, strict=True))
        if min(experts.step, inputs.step, outputs.step) < 1:
            raise ValueError(f"{self.name}: reads take increasing slices, not {index}.")
        inputs_span, outputs_span = _span(inputs), _span(outputs)
        first = inputs_span.start // BLOCK_VALUES
        last = -(-inputs_span.stop // BLOCK_VALUES)
        within = slice(inputs_span.start - first * BLOCK_VALUES, None, inputs.step)
        result = np.empty((len(experts), len(inputs), len(outputs)), self.dtype)
        for position, expert in enumerate(experts):
            box = (slice(expert, expert + 1), outputs_span, slice(first, last))
            scales_OxG = self.scales.read(box)[0]
            if (scales_OxG == SCALE_NAN).any():
                raise CheckpointError(
                    f"{self.path.name}: {self.name}_scales of expert {expert} holds the E8M0 NaN "
                    f"scale ({SCALE_NAN}); the checkpoint is corrupt: download it again."
                )
            values_OxI = dequantize(self.blocks.read(box)[0], scales_OxG)
            values_OxI = values_OxI[:: outputs.step, within][:, : len(inputs)]
            result[position] = values_OxI.T.astype(self.dtype)
        return result


def _span(indices: range) -> slice:
    """The contiguous slice from the first to the last of increasing indices."""
    if not len(indices):
        return slice(indices.start, indices.start)
    return slice(indices.start, indices[-1] + 1)


def dequantized_entries(
    entries: dict[str, TensorEntry], dtype: np.dtype
) -> dict[str, TensorEntry | Mxfp4Entry]:
    """The checkpoint's tensors with each expert's `<proj>_blocks` and `<proj>_scales` read as
    one dequantized `<proj>` in `dtype`; CheckpointError for an MXFP4 tensor elsewhere (only
    gpt-oss's mlp.experts.gate_up_proj and down_proj are read), a half pair or a bad shape."""
    quantized = {name.rsplit("_", 1)[0] for name in entries if name.endswith(_SUFFIXES)}
    result = {n: e for n, e in entries.items() if not n.endswith(_SUFFIXES)}
    for name in sorted(quantized):
        blocks, scales = entries.get(f"{name}_blocks"), entries.get(f"{name}_scales")
        if not _EXPERT_TENSOR.fullmatch(name):
            raise CheckpointError(
                f"{(blocks or scales).path.name}: {name}_{'blocks' if blocks else 'scales'} is "
                "an MXFP4 tensor outside gpt-oss's experts; sft_jax dequantizes only "
                "model.layers.N.mlp.experts.gate_up_proj and down_proj. Load it with a "
                "dequantized copy of the checkpoint instead."
            )
        if blocks is None or scales is None:
            present, missing = ("blocks", "scales") if blocks is not None else ("scales", "blocks")
            raise CheckpointError(
                f"{(blocks or scales).path.name}: {name}_{present} has no {name}_{missing}; "
                "the checkpoint is incomplete."
            )
        _check_pair(name, blocks, scales)
        result[name] = Mxfp4Entry(name, blocks, scales, np.dtype(dtype))
    return result


def _check_pair(name: str, blocks: TensorEntry, scales: TensorEntry) -> None:
    expected = (*scales.shape, BLOCK_VALUES // 2)
    uint8 = np.dtype(np.uint8)
    if blocks.dtype != uint8 or scales.dtype != uint8 or blocks.shape != expected:
        raise CheckpointError(
            f"{blocks.path.name}: {name}_blocks {blocks.dtype} {blocks.shape} and _scales "
            f"{scales.dtype} {scales.shape} are not MXFP4 (uint8 blocks [X, O, G, 16] and "
            "uint8 scales [X, O, G])."
        )
