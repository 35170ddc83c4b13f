"""RoPE as config.json describes it: RopeSpec (its frequencies for every supported rope type)
and the reading of rope_parameters / rope_scaling, per layer type where a family has several."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sft_jax.models.families import UnsupportedModelError, family_of

_SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "dynamic", "proportional")


@dataclasses.dataclass(frozen=True)
class RopeSpec:
    """Rotary embedding of one attention kind: base and optional frequency scaling, with the
    fields of transformers' rope_parameters (modeling_rope_utils) that each scaling reads."""

    theta: float
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    original_max_position_embeddings: int = 8192  # llama3, yarn: the pretraining length
    beta_fast: float = 32.0  # yarn: rotations above which a dimension keeps its frequency
    beta_slow: float = 1.0  # yarn: rotations below which a dimension is interpolated
    truncate: bool = True  # yarn: round the ramp's ends to whole dimensions
    # yarn: cos and sin are multiplied by this (so q.k by its square); 1 for the other types.
    attention_factor: float = 1.0
    max_position_embeddings: int = 0  # dynamic: the length beyond which the base grows
    # The leading fraction of each head that turns (Qwen3.5: int(head_dim * factor) dims, the
    # rest passes through; proportional: the share of the head's frequency pairs).
    partial_rotary_factor: float = 1.0
    # Multimodal RoPE (Qwen2.5-VL, models/mrope.py): how many of the head's frequency pairs
    # turn by the temporal, height and width position; () for 1-D positions.
    mrope_section: tuple[int, ...] = ()

    def inverse_frequencies(self, head_dim: int) -> np.ndarray:
        """Inverse frequencies [head_dim // 2] in float32, computed as transformers does
        (for "dynamic": those of sequences up to max_position_embeddings)."""
        exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim
        inv_freq = (1.0 / (self.theta**exponents)).astype(np.float32)
        if self.rope_type == "linear":
            return inv_freq / np.float32(self.factor)
        if self.rope_type == "llama3":
            return self._llama3_scaled(inv_freq)
        if self.rope_type == "yarn":
            return self._yarn_scaled(head_dim)
        if self.rope_type == "proportional":
            return proportional_inverse_frequencies(self, head_dim)
        return inv_freq

    def dynamic_inverse_frequencies(self, head_dim: int, seq_len: jax.Array) -> jax.Array:
        """ "dynamic" (NTK-aware) scaling: the base grows with the batch's longest position
        `seq_len` (max position + 1) once it passes max_position_embeddings, as transformers'
        dynamic_rope_update does on a fresh model (it also keeps a grown base for later, shorter
        batches; here each batch gets its own)."""
        max_len = jnp.float32(self.max_position_embeddings)
        seq_len = jnp.maximum(seq_len.astype(jnp.float32), max_len)
        growth = (self.factor * seq_len / max_len - (self.factor - 1)) ** (
            head_dim / (head_dim - 2)
        )
        base = jnp.float32(self.theta) * growth
        exponents = jnp.arange(0, head_dim, 2, dtype=jnp.int32).astype(jnp.float32) / head_dim
        return 1.0 / base**exponents

    def _llama3_scaled(self, inv_freq: np.ndarray) -> np.ndarray:
        # Long wavelengths are divided by `factor`, short ones kept, the band between blended.
        low_freq_wavelen = self.original_max_position_embeddings / self.low_freq_factor
        high_freq_wavelen = self.original_max_position_embeddings / self.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_freq_wavelen, inv_freq / self.factor, inv_freq)
        smooth = (self.original_max_position_embeddings / wavelen - self.low_freq_factor) / (
            self.high_freq_factor - self.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
        is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        return np.where(is_medium, smoothed, scaled).astype(np.float32)

    def _yarn_scaled(self, head_dim: int) -> np.ndarray:
        # Dimensions that turn more than beta_fast times over the pretraining length keep their
        # frequency, those under beta_slow are divided by `factor`, a linear ramp between.
        pos_freqs = self.theta ** (np.arange(0, head_dim, 2).astype(np.float32) / head_dim)
        extrapolated = (1.0 / pos_freqs).astype(np.float32)
        interpolated = (1.0 / (self.factor * pos_freqs)).astype(np.float32)

        def correction_dim(rotations: float) -> float:
            turns = self.original_max_position_embeddings / (rotations * 2 * math.pi)
            return head_dim * math.log(turns) / (2 * math.log(self.theta))

        low, high = correction_dim(self.beta_fast), correction_dim(self.beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, head_dim - 1)
        if low == high:
            high += 0.001  # as transformers: no division by zero
        ramp = np.clip((np.arange(head_dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
        keep = (1 - ramp).astype(np.float32)
        return (interpolated * (1 - keep) + extrapolated * keep).astype(np.float32)


def _rope_spec(params: dict[str, Any], hf: Any) -> RopeSpec:
    """The RopeSpec of one rope_parameters dict (config.json's rope_scaling / rope_parameters),
    or UnsupportedModelError naming the field, raised before any weight is read."""
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in _SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"{hf.model_type}: config.json rope_scaling (rope_parameters) rope_type "
            f"{rope_type!r} is not supported; supported rope types: "
            f"{', '.join(_SUPPORTED_ROPE_TYPES)}."
        )
    partial = params.get("partial_rotary_factor", getattr(hf, "partial_rotary_factor", None))
    partial_ok = family_of(hf.model_type).gated_delta_net or rope_type == "proportional"
    if partial not in (None, 1, 1.0) and not partial_ok:
        raise UnsupportedModelError(
            f"{hf.model_type}: config.json partial_rotary_factor={partial} (RoPE on part of each "
            "head) is not supported; sft_jax rotates the whole head."
        )
    fields = {f.name for f in dataclasses.fields(RopeSpec)}
    fields -= {"theta", "rope_type", "attention_factor", "max_position_embeddings"}
    fields -= {"partial_rotary_factor", "mrope_section"}
    spec = RopeSpec(
        theta=float(params["rope_theta"]),
        rope_type=rope_type,
        max_position_embeddings=int(getattr(hf, "max_position_embeddings", 0) or 0),
        partial_rotary_factor=float(partial or 1.0),
        **{k: params[k] for k in fields if params.get(k) is not None},
    )
    if rope_type == "yarn":
        return _yarn_spec(spec, params, hf)
    if rope_type == "dynamic" and spec.max_position_embeddings < 1:
        raise UnsupportedModelError(
            f"{hf.model_type}: rope_type 'dynamic' needs config.json max_position_embeddings."
        )
    return spec


def _yarn_spec(spec: RopeSpec, params: dict[str, Any], hf: Any) -> RopeSpec:
    """YaRN's factor (max_position_embeddings / original_max_position_embeddings when absent)
    and the attention factor transformers derives from it, mscale and mscale_all_dim."""
    factor = params.get("factor")
    if factor is None:
        factor = hf.max_position_embeddings / spec.original_max_position_embeddings

    def mscale_of(scale: float, mscale: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = mscale_of(factor, mscale) / mscale_of(factor, mscale_all_dim)
        else:
            attention_factor = mscale_of(factor)
    return dataclasses.replace(spec, factor=float(factor), attention_factor=float(attention_factor))


def rope_table(hf: Any, layer_types: tuple[str, ...]) -> tuple[tuple[str, RopeSpec], ...]:
    params = dict(hf.rope_parameters)
    if all(isinstance(v, dict) for v in params.values()):  # per layer type (Gemma 3)
        return tuple((kind, _rope_spec(params[kind], hf)) for kind in sorted(set(layer_types)))
    spec = _rope_spec(params, hf)
    return tuple((kind, spec) for kind in sorted(set(layer_types)))


def proportional_inverse_frequencies(rope: RopeSpec, head_dim: int) -> np.ndarray:
    """ "proportional" RoPE (Gemma 4's full layers): the first partial_rotary_factor of the
    head's frequency pairs at theta ** (-2i / head_dim), the rest 0 (not rotated), / factor."""
    rotated = int(rope.partial_rotary_factor * head_dim // 2)
    exponents = np.arange(0, 2 * rotated, 2, dtype=np.int64).astype(np.float32) / head_dim
    inv_freq = np.zeros(head_dim // 2, np.float32)
    inv_freq[:rotated] = 1.0 / (rope.theta**exponents)
    return (inv_freq / np.float32(rope.factor)).astype(np.float32)
