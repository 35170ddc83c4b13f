"""Planning a deep model from shallow compiles: two depths compiled, the rest extrapolated.

A decoder's layers repeat, so whatever the compiled train step needs per device (memory,
FLOPs, collective bytes) is, to within a few percent, a constant (embedding, LM head, loss,
optimizer state of both) plus one share per layer. The planner compiles a candidate with d1 and
d2 layers, whole periods of the model's layer pattern (sliding / full attention, dense / expert
MLP), and extends the line through the two to the full depth: an 8B model's 32 layers cost the
compile time of 6. tests/planning/test_plan.py checks the line against a full compile.
"""

from __future__ import annotations

import dataclasses
import math

from sft_jax.models import ModelConfig
from sft_jax.train.memory import StepMemory

MIN_LAYERS = 2  # the shallower compile has at least this many layers


def layer_kind(shape: ModelConfig, i: int) -> tuple:
    """Everything that makes layer i cost what it does: attention type, expert MLP, RoPE or
    not, head dim, kv heads, MLP width, keys and values of its own or an earlier layer's
    (Gemma 4's KV sharing), values that are the keys."""
    return (
        shape.layer_types[i],
        shape.is_moe_layer(i),
        i in shape.nope_layers,
        shape.head_dim_of(i),
        shape.kv_heads_of(i),
        shape.mlp_width_of(i),
        shape.kv_source_of(i) == i,
        i in shape.value_is_key_layers,
    )


def layer_period(shape: ModelConfig) -> int:
    """The fewest layers after which the kinds of layer (layer_kind) repeat; the model's depth
    where they never do (e.g. the first k layers dense, Gemma 4's last layers sharing keys and
    values)."""
    kinds = [layer_kind(shape, i) for i in range(shape.num_layers)]
    for period in range(1, shape.num_layers + 1):
        if all(kinds[i] == kinds[i % period] for i in range(shape.num_layers)):
            return period
    return shape.num_layers


def depths(shape: ModelConfig) -> tuple[int, int] | None:
    """(d1, d2) layers to compile, whole periods, or None where they would not be fewer layers
    than the model has (then the planner compiles it whole)."""
    period = layer_period(shape)
    shallow = period * math.ceil(MIN_LAYERS / period)
    if 2 * shallow >= shape.num_layers:
        return None
    return shallow, 2 * shallow


def truncated(shape: ModelConfig, layers: int) -> ModelConfig:
    """The model's first `layers` layers (embedding, final norm and LM head kept), every
    per-layer field cut to them."""
    return dataclasses.replace(
        shape,
        num_layers=layers,
        layer_types=shape.layer_types[:layers],
        moe_layers=tuple(i for i in shape.moe_layers if i < layers),
        nope_layers=tuple(i for i in shape.nope_layers if i < layers),
        value_is_key_layers=tuple(i for i in shape.value_is_key_layers if i < layers),
        layer_head_dims=shape.layer_head_dims[:layers],
        layer_kv_heads=shape.layer_kv_heads[:layers],
        layer_mlp_widths=shape.layer_mlp_widths[:layers],
        kv_sources=shape.kv_sources[:layers],
    )


def line(at_d1: float, at_d2: float, d1: int, d2: int, depth: int) -> float:
    """The value at `depth` of the line through (d1, at_d1) and (d2, at_d2)."""
    return at_d1 + (at_d2 - at_d1) * (depth - d1) / (d2 - d1)


def memory(a: StepMemory | None, b: StepMemory | None, d1: int, d2: int, depth: int):
    """StepMemory at `depth` from the plans at d1 and d2 layers (code size: the deeper one's)."""
    if a is None or b is None:
        return None
    fields = ("arguments", "outputs", "aliased", "temporaries")
    grown = {f: round(line(getattr(a, f), getattr(b, f), d1, d2, depth)) for f in fields}
    return StepMemory(**grown, code=b.code)


def per_kind(a: dict[str, float], b: dict[str, float], d1: int, d2: int, depth: int):
    """A per-collective-kind table of bytes at `depth` (never below zero)."""
    return {k: max(0.0, line(a[k], b[k], d1, d2, depth)) for k in a}
