"""LoRA and QLoRA: adapters on chosen linear layers, a frozen (optionally 4-bit) base, PEFT export.

PEFT's layout is followed so that `peft.PeftModel.from_pretrained` loads our adapters: for a
layer with weight W [out, in], lora_A.weight is [rank, in], lora_B.weight is [out, rank] and the
layer computes W x + scale * B A x with scale = alpha / rank (alpha / sqrt(rank) with rsLoRA).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from sft_jax.errors import ConfigError
from sft_jax.models import safetensors_io
from sft_jax.models.decoder import (
    ATTENTION_PROJECTIONS,
    MLP_PROJECTIONS,
    CausalLM,
    decoder_linears,
)
from sft_jax.models.hf_io import hf_module_name, to_host
from sft_jax.models.layers import LoRAParam
from sft_jax.models.moe import EXPERT_PARAMS, add_expert_adapters, moe_blocks
from sft_jax.models.partitioning import named_sharding
from sft_jax.models.quantize import QuantSpec

PROJECTIONS = ATTENTION_PROJECTIONS + MLP_PROJECTIONS
# Modules trained in full beside the adapters, by their Hugging Face names.
EXTRA_MODULES = {"embed": "model.embed_tokens", "lm_head": "lm_head"}


@dataclasses.dataclass(frozen=True)
class LoRASpec:
    """What config.lora asks for; rank 0 means full fine-tuning."""

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = PROJECTIONS
    use_rslora: bool = False
    extra_trainable: tuple[str, ...] = ()  # "embed" and/or "lm_head", trained in full
    quantization: QuantSpec | None = None
    experts: bool = False  # adapters on every expert's projections too (merged export only)
    train_router: bool = False  # the routers of a mixture of experts trained in full

    @property
    def enabled(self) -> bool:
        """Whether this run trains adapters (else every parameter: full fine-tuning)."""
        return self.rank > 0

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def for_model(self, model: CausalLM) -> LoRASpec:
        """The spec as it applies to `model`: with tied embeddings the LM head is the embedding
        matrix, so training "lm_head" trains "embed" (there is no separate head to update)."""
        if model.lm_head is not None or "lm_head" not in self.extra_trainable:
            return self
        others = [module for module in self.extra_trainable if module != "lm_head"]
        extras = tuple(dict.fromkeys(["embed", *others]))
        return dataclasses.replace(self, extra_trainable=extras)

    @classmethod
    def from_config(cls, lora: ml_collections.ConfigDict) -> LoRASpec:
        """The spec of config.lora (whose values config_check has checked)."""
        targets = PROJECTIONS if lora.target_modules == "all-linear" else names(lora.target_modules)
        quantization = (
            QuantSpec(lora.quantize, lora.quant_block_size, lora.double_quant)
            if lora.quantize
            else None
        )
        return cls(
            lora.rank, lora.alpha, lora.dropout, targets, lora.use_rslora,
            names(lora.trainable_modules), quantization,
            lora.get("expert_adapters", False), lora.get("train_router", False),
        )  # fmt: skip


def names(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


def trainable_filter(spec: LoRASpec) -> Any:
    """What the optimizer updates: every parameter, or the adapters plus any extra modules."""
    if not spec.enabled:
        return nnx.Param
    extras = [nnx.PathContains(module) for module in spec.extra_trainable]
    if spec.train_router:
        extras.append(nnx.PathContains("router"))
    return nnx.Any(LoRAParam, *extras)


def apply_lora(model: CausalLM, spec: LoRASpec, mesh: Mesh, seed: int = 0) -> None:
    """Adds adapters to the target layers: A ~ U(+-1/sqrt(in)) (PEFT's default), B = 0, so the
    adapted model starts equal to the base model."""
    key = jax.random.key(seed)
    for index, name, linear in decoder_linears(model):
        if name not in spec.targets:
            continue
        in_features, out_features = linear.in_features, linear.out_features
        a_axes, b_axes = (linear.axes[0], "lora_rank"), ("lora_rank", linear.axes[1])
        a_sharding = named_sharding(a_axes, (in_features, spec.rank), mesh)
        b_sharding = named_sharding(b_axes, (spec.rank, out_features), mesh)
        layer_key = jax.random.fold_in(key, index * 16 + PROJECTIONS.index(name))
        a = _uniform_init(layer_key, (in_features, spec.rank), a_sharding)
        linear.lora_a = LoRAParam(a, logical_axes=a_axes)
        linear.lora_b = LoRAParam(
            jax.device_put(jnp.zeros((spec.rank, out_features), jnp.float32), b_sharding),
            logical_axes=b_axes,
        )
        linear.lora_scale = spec.scale
        linear.lora_dropout = spec.dropout
    for index, block in enumerate(moe_blocks(model) if spec.experts else ()):
        block_key = jax.random.fold_in(key, len(model.layers) * 16 + index)  # after the linears'
        add_expert_adapters(block, spec.rank, spec.scale, block_key)
        for variable in block.expert_lora.values():
            value = variable.get_value()
            variable.set_value(
                jax.device_put(value, named_sharding(variable.logical_axes, value.shape, mesh))
            )


@partial(jax.jit, static_argnames=("shape", "out_sharding"))
def _uniform_init(key: jax.Array, shape: tuple[int, int], out_sharding: Any) -> jax.Array:
    """U(+-1/sqrt(in)) [in, rank], made on its devices (compiled once per shape/sharding)."""
    bound = 1.0 / math.sqrt(shape[0])
    values = jax.random.uniform(key, shape, jnp.float32, -bound, bound)
    return jax.lax.with_sharding_constraint(values, out_sharding)


@contextlib.contextmanager
def adapters_off(model: CausalLM) -> Iterator[CausalLM]:
    """The same model (the same weights, no copy) computing as its base inside the block: every
    adapter's scale is 0, so W x + 0 * B A x = W x. The reference of preference tuning under
    LoRA / QLoRA (sft_jax.preference); the scales come back on leaving, also on an error."""
    scales = [(linear, linear.lora_scale) for _, _, linear in decoder_linears(model)]
    expert_scales = [(block, block.expert_lora_scale) for block in moe_blocks(model)]
    try:
        for linear, _ in scales:
            linear.lora_scale = 0.0
        for block, _ in expert_scales:
            block.expert_lora_scale = 0.0
        yield model
    finally:
        for linear, scale in scales:
            linear.lora_scale = scale
        for block, scale in expert_scales:
            block.expert_lora_scale = scale


def merged(model: CausalLM) -> CausalLM:
    """A plain model (no adapters, no quantization) with W + scale * A B folded into each kernel."""
    plain = nnx.eval_shape(
        lambda: CausalLM(
            model.config, dtype=model.dtype, param_dtype=model.embed[...].dtype, rngs=nnx.Rngs(0)
        )
    )
    graphdef, abstract = nnx.split(plain, nnx.Param)
    source = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    linears = {(index, name): linear for index, name, linear in decoder_linears(model)}
    values = []
    for path, variable in nnx.to_flat_state(abstract):
        # Kernels of the adaptable projections (not the shared expert of a mixture of experts).
        if path[0] == "layers" and path[-1] == "kernel" and (path[1], path[3]) in linears:
            linear = linears[(path[1], path[3])]
            kernel = linear.weight().astype(jnp.float32)
            if linear.lora_a is not None:
                kernel = kernel + linear.lora_scale * (linear.lora_a[...] @ linear.lora_b[...])
            value = kernel.astype(variable.get_value().dtype)
        elif path[0] == "layers" and path[-1] in EXPERT_PARAMS:  # with any expert adapters
            block = model.layers[path[1]].mlp
            value = block.expert_weight(path[-1], variable.get_value().dtype)
        else:
            value = source[path].get_value()
        values.append((path, variable.replace(value)))
    return nnx.merge(graphdef, nnx.from_flat_state(values))


def save_adapter(
    model: CausalLM, out_dir: str | Path, spec: LoRASpec, base_model: str = ""
) -> Path:
    """adapter_config.json + adapter_model.safetensors in PEFT's format (process 0 writes).
    Adapters on the experts of a mixture of experts have no PEFT form here: export merged."""
    out_dir = Path(out_dir)
    if any(block.expert_lora is not None for block in moe_blocks(model)):
        raise ConfigError(
            "config.lora.expert_adapters=True: adapters on the experts export merged only (the "
            "full model, lora.merged); the PEFT adapter holds attention and MLP adapters alone."
        )
    tensors = []
    for index, name, linear in decoder_linears(model):
        if linear.lora_a is None:
            continue
        prefix = f"base_model.model.{hf_module_name(index, name)}"
        tensors.append(_pending(f"{prefix}.lora_A.weight", linear.lora_a[...], transpose=True))
        tensors.append(_pending(f"{prefix}.lora_B.weight", linear.lora_b[...], transpose=True))
    extras = list(spec.extra_trainable)
    if model.config.tie_word_embeddings and extras and "lm_head" not in extras:
        extras.append("lm_head")  # PEFT ties its copies: the head's must be in the file too
    for module in extras:
        array = (
            model.embed[...] if module == "embed" or model.lm_head is None else model.lm_head[...]
        )
        tensors.append(
            _pending(f"base_model.model.{EXTRA_MODULES[module]}.weight", array, transpose=False)
        )
    write = jax.process_index() == 0
    if write:
        out_dir.mkdir(parents=True, exist_ok=True)
    for t in tensors if not write else []:
        t.produce()
    if write:
        safetensors_io.write_file(out_dir / "adapter_model.safetensors", tensors, {"format": "pt"})
        (out_dir / "adapter_config.json").write_text(
            json.dumps(
                _adapter_config(spec, base_model, model.config.tie_word_embeddings), indent=2
            )
            + "\n"
        )
    return out_dir


def _pending(name: str, array: jax.Array, transpose: bool) -> safetensors_io.PendingTensor:
    shape = tuple(array.shape[::-1] if transpose else array.shape)
    dtype = np.dtype(array.dtype)

    def produce() -> np.ndarray:
        host = to_host(array)
        return host.T if transpose else host

    return safetensors_io.PendingTensor(name, shape, dtype, produce)


def _adapter_config(spec: LoRASpec, base_model: str, tied: bool) -> dict[str, Any]:
    return {
        # A trained, tied embedding is also the LM head (as in sft_jax); without this PEFT
        # would keep the head on the old embedding.
        "ensure_weight_tying": tied and bool(spec.extra_trainable),
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model or None,
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "use_rslora": spec.use_rslora,
        "target_modules": sorted(spec.targets),
        "modules_to_save": [EXTRA_MODULES[m].split(".")[-1] for m in spec.extra_trainable] or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
