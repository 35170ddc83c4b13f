"""LoRA on an image-text model's vision part (config.lora.vision_targets): its linear layers by
the names transformers gives them, and the PEFT form of their adapters.

config.lora.vision_targets is "" (off: adapters on the language model only), "all-linear"
(every linear layer of the vision tower and the projector) or a comma list of these names:
  Gemma 3     q_proj, k_proj, v_proj, out_proj, fc1, fc2 (the SigLIP tower's layers) and
              mm_input_projection_weight (multi_modal_projector's projection, a bare
              nn.Parameter in transformers: PEFT adapts it through target_parameters)
  Qwen2.5-VL  qkv, proj, gate_proj, up_proj, down_proj (the ViT blocks) and mlp.0, mlp.2 (the
              merger)
The patch embeddings (convolutions in transformers) are not adapted. The vision adapters are
plain LoRA (alpha / r, or rsLoRA) without dropout: PEFT's parameter adapters refuse dropout,
DoRA and AdaLoRA, and the tower runs without dropout keys here; adapter_checks refuses those.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from typing import Any

from sft_jax.core.errors import ConfigError
from sft_jax.models.io.gemma3_vision import is_gemma3
from sft_jax.models.layers import Linear

FIELD = "config.lora.vision_targets"
GEMMA3_TARGETS = (
    "q_proj",
    "k_proj",
    "v_proj",
    "out_proj",
    "fc1",
    "fc2",
    "mm_input_projection_weight",
)
QWEN_VL_TARGETS = ("qkv", "proj", "gate_proj", "up_proj", "down_proj", "mlp.0", "mlp.2")
_GEMMA3_PROJECTOR = "model.multi_modal_projector"
_GEMMA3_LAYER = "model.vision_tower.encoder.layers"  # transformers 5's module names


@dataclasses.dataclass(frozen=True)
class VisionLinear:
    """A linear layer of the vision part: its target name, its module's name in transformers'
    model (PEFT's), and whether transformers holds it as a bare parameter (Gemma 3's
    projection, adapted through PEFT's target_parameters)."""

    target: str
    module: str
    linear: Linear
    parameter: str = ""


def available(config: Any) -> tuple[str, ...]:
    """The vision target names of a ModelConfig (none for a text model)."""
    if config.vision is None:
        return ()
    return GEMMA3_TARGETS if is_gemma3(config) else QWEN_VL_TARGETS


def resolve(targets: tuple[str, ...], config: Any) -> tuple[str, ...]:
    """The target names `targets` (config.lora.vision_targets split at commas) means for this
    model, in the family's order; a clear ConfigError for a name it does not have."""
    if not targets:
        return ()
    names = available(config)
    if not names:
        raise ConfigError(
            f"{FIELD}={','.join(targets)!r}: this model has no vision part; set it to ''."
        )
    if "all-linear" in targets:
        return names
    unknown = [name for name in targets if name not in names]
    if unknown:
        family = "Gemma 3" if is_gemma3(config) else "Qwen2.5-VL"
        raise ConfigError(
            f"{FIELD}: unknown {unknown}; {family}'s vision linears are {', '.join(names)} "
            "(or 'all-linear', or '' for none)."
        )
    return tuple(name for name in names if name in targets)


def vision_linears(model: Any) -> Iterator[VisionLinear]:
    """Every adaptable linear layer of the model's vision part, in a fixed order."""
    vision = model.vision
    if vision is None:
        return
    if is_gemma3(model.config):
        for index, layer in enumerate(vision.tower.layers):
            for name in GEMMA3_TARGETS[:-1]:
                group = "mlp" if name.startswith("fc") else "self_attn"
                module = f"{_GEMMA3_LAYER}.{index}.{group}.{name}"
                yield VisionLinear(name, module, getattr(layer, name))
        parameter = GEMMA3_TARGETS[-1]
        yield VisionLinear(parameter, _GEMMA3_PROJECTOR, vision.projection, parameter)
        return
    for index, block in enumerate(vision.blocks):
        for name in ("qkv", "proj"):
            yield VisionLinear(
                name, f"model.visual.blocks.{index}.attn.{name}", getattr(block.attn, name)
            )
        for name in ("gate_proj", "up_proj", "down_proj"):
            yield VisionLinear(
                name, f"model.visual.blocks.{index}.mlp.{name}", getattr(block.mlp, name)
            )
    for ours, name in (("fc1", "mlp.0"), ("fc2", "mlp.2")):
        yield VisionLinear(name, f"model.visual.merger.{name}", getattr(vision.merger, ours))


def adapted(model: Any) -> list[VisionLinear]:
    """The vision linears that hold adapters."""
    return [entry for entry in vision_linears(model) if entry.linear.lora_a is not None]


def peft_fields(model: Any, language_regex: str) -> dict[str, Any]:
    """PEFT's target_modules (one regex, matched whole: the language model's projections and
    the adapted vision modules) and target_parameters of an image-text model's adapter."""
    entries = adapted(model)
    modules = [e.module for e in entries if not e.parameter]
    parameters = [f"{e.module}.{e.parameter}" for e in entries if e.parameter]
    # One pattern per module kind, any layer (the adapters sit on every layer alike).
    layers = dict.fromkeys(re.sub(r"\\\.\d+\\\.", r"\\.\\d+\\.", re.escape(m)) for m in modules)
    patterns = [language_regex, *layers]
    fields: dict[str, Any] = {"target_modules": "|".join(f"(?:{p})" for p in patterns)}
    if parameters:
        fields["target_parameters"] = parameters
    return fields


def peft_tensors(entry: VisionLinear) -> tuple[tuple[str, Any, bool], ...]:
    """(PEFT's name below base_model.model, array, stored transposed) of an adapter.

    A module's lora_A.weight is [rank, in] and lora_B.weight [out, rank]: our A [in, rank] and
    B [rank, out] transposed. A parameter's adapter (PEFT's ParamWrapper on Gemma 3's
    mm_input_projection_weight [W, D]) adds scale * lora_B.weight @ lora_A.weight, [W, r] @
    [r, D]: our A [W, r] @ B [r, D], so lora_B.weight is our A and lora_A.weight our B, as is.
    """
    a, b = entry.linear.lora_a[...], entry.linear.lora_b[...]
    if entry.parameter:
        return (f"{entry.module}.lora_A.weight", b, False), (
            f"{entry.module}.lora_B.weight",
            a,
            False,
        )
    return (f"{entry.module}.lora_A.weight", a, True), (f"{entry.module}.lora_B.weight", b, True)
