"""LoRA, DoRA, AdaLoRA and QLoRA: adapters on chosen linear layers, a frozen (optionally 4-bit)
base, PEFT export.

PEFT's layout is followed so that `peft.PeftModel.from_pretrained` loads our adapters: for a
layer with weight W [out, in], lora_A.weight is [rank, in], lora_B.weight is [out, rank] and the
layer computes W x + scale * B A x with scale = alpha / rank (alpha / sqrt(rank) with rsLoRA).
DoRA adds lora_magnitude_vector [out]; AdaLoRA (sft_jax.adapters.adalora) stores lora_A [rank, in],
lora_E [rank, 1], lora_B [out, rank] with scale = alpha / (init_r + 1e-5), cut to its kept ranks.
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
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from sft_jax.adapters.adalora import AdaLoRASpec
from sft_jax.core.errors import ConfigError
from sft_jax.core.spec import LoraConfigSpec
from sft_jax.models.decoder import (
    ATTENTION_PROJECTIONS,
    MLP_PROJECTIONS,
    CausalLM,
    decoder_linears,
)
from sft_jax.models.io import gemma3_vision as vision_io
from sft_jax.models.io import safetensors as safetensors_io
from sft_jax.models.io.hf import hf_module_name, to_host
from sft_jax.models.layers import TRAINABLE, TRAINABLE_WITH_VISION, LoRAParam
from sft_jax.models.linear_attention import LINEAR_PROJECTIONS
from sft_jax.models.mla import MLA_ONLY_PROJECTIONS
from sft_jax.models.moe import EXPERT_PARAMS, add_expert_adapters, moe_blocks
from sft_jax.models.partitioning import named_sharding
from sft_jax.models.per_layer import Buffer
from sft_jax.models.quantize import QuantSpec

# Latent attention's (DeepSeek-V3) and Gated DeltaNet's (Qwen3.5) own projections last:
# earlier names keep their index, which seeds each adapter's init.
PROJECTIONS = ATTENTION_PROJECTIONS + MLP_PROJECTIONS + MLA_ONLY_PROJECTIONS + LINEAR_PROJECTIONS
ADAPTER_METHODS = ("lora", "adalora")  # config.lora.method
# Modules trained in full beside the adapters, by their Hugging Face names (config choices).
EXTRA_MODULES = {"embed": "model.embed_tokens", "lm_head": "lm_head"}
# ... and a reward model's new score head, always trained in full under LoRA (PEFT's
# modules_to_save=["score"], which task_type SEQ_CLS adds and TRL's RewardTrainer uses).
SAVED_MODULES = EXTRA_MODULES | {"score": "score"}


@dataclasses.dataclass(frozen=True)
class LoRASpec:
    """What config.lora asks for; rank 0 means full fine-tuning."""

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = PROJECTIONS
    use_rslora: bool = False
    extra_trainable: tuple[str, ...] = ()  # "embed", "lm_head", "score": trained in full
    quantization: QuantSpec | None = None
    use_dora: bool = False  # DoRA: a trained magnitude per output feature (PEFT's use_dora)
    adalora: AdaLoRASpec | None = None  # AdaLoRA: SVD-form adapters of initial rank `rank`
    experts: bool = False  # adapters on every expert's projections too (merged export only)
    train_router: bool = False  # the routers of a mixture of experts trained in full

    @property
    def enabled(self) -> bool:
        """Whether this run trains adapters (else every parameter: full fine-tuning)."""
        return self.rank > 0

    @property
    def scale(self) -> float:
        if self.adalora is not None:  # PEFT: scaling / (ranknum + 1e-5), ranknum = init_r
            return self.alpha / (self.rank + 1e-5)
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def for_model(self, model: CausalLM) -> LoRASpec:
        """The spec as it applies to `model`: with tied embeddings the LM head is the embedding
        matrix, so training "lm_head" trains "embed" (there is no separate head to update); a
        reward model's score head is new, so it trains in full ("score")."""
        extras = list(self.extra_trainable)
        if model.lm_head is None and "lm_head" in extras:
            extras = ["embed", *(module for module in extras if module != "lm_head")]
        if model.score is not None:
            extras.append("score")
        return dataclasses.replace(self, extra_trainable=tuple(dict.fromkeys(extras)))

    @classmethod
    def from_config(cls, lora: LoraConfigSpec, train_steps: int = 0) -> LoRASpec:
        """The spec of config.lora (whose values config_check has checked); train_steps is
        AdaLoRA's total_step where config.lora.adalora.total_step is 0."""
        targets = PROJECTIONS if lora.target_modules == "all-linear" else names(lora.target_modules)
        quantization = (
            QuantSpec(lora.quantize, lora.quant_block_size, lora.double_quant)
            if lora.quantize
            else None
        )
        adalora = None
        if lora.method == "adalora":
            ada = lora.adalora  # PEFT's fields by the same names; init_r is the LoRA rank
            adalora = AdaLoRASpec(
                init_r=lora.rank, **(ada.to_dict() | {"total_step": ada.total_step or train_steps})
            )
        return cls(
            lora.rank,
            lora.alpha,
            lora.dropout,
            targets,
            lora.use_rslora,
            names(lora.trainable_modules),
            quantization,
            lora.use_dora,
            adalora,
            lora.expert_adapters,
            lora.train_router,
        )


def names(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


def trainable_filter(spec: LoRASpec) -> Any:
    """What the optimizer updates: every parameter, or the adapters plus any extra modules."""
    if not spec.enabled:
        return TRAINABLE
    extras = [nnx.PathContains(module) for module in spec.extra_trainable]
    if spec.train_router:
        extras.append(nnx.PathContains("router"))
    return nnx.Any(LoRAParam, *extras)


def apply_lora(model: CausalLM, spec: LoRASpec, mesh: Mesh, seed: int = 0) -> None:
    """Adds adapters to the target layers, starting equal to the base model as PEFT's do:
    LoRA A ~ U(+-1/sqrt(in)), B = 0; AdaLoRA P, Q ~ N(0, 0.02), Lambda = 0; DoRA's magnitude
    = the column norms of the (dequantized) kernel."""
    key = jax.random.key(seed)
    for index, name, linear in decoder_linears(model):
        if name not in spec.targets:
            continue
        in_features, out_features = linear.in_features, linear.out_features
        a_axes, b_axes = (linear.axes[0], "lora_rank"), ("lora_rank", linear.axes[1])
        a_sharding = named_sharding(a_axes, (in_features, spec.rank), mesh)
        b_sharding = named_sharding(b_axes, (spec.rank, out_features), mesh)
        a_key, b_key = jax.random.split(
            jax.random.fold_in(key, index * 16 + PROJECTIONS.index(name))
        )
        if spec.adalora is None:
            a = _uniform_init(a_key, (in_features, spec.rank), a_sharding)
            b = jax.device_put(jnp.zeros((spec.rank, out_features), jnp.float32), b_sharding)
        else:
            a = _normal_init(a_key, (in_features, spec.rank), a_sharding)
            b = _normal_init(b_key, (spec.rank, out_features), b_sharding)
            e_sharding = named_sharding(("lora_rank",), (spec.rank,), mesh)
            e = jax.device_put(jnp.zeros((spec.rank,), jnp.float32), e_sharding)
            linear.lora_e = LoRAParam(e, logical_axes=("lora_rank",))
        linear.lora_a = LoRAParam(a, logical_axes=a_axes)
        linear.lora_b = LoRAParam(b, logical_axes=b_axes)
        linear.lora_scale = spec.scale
        linear.lora_dropout = spec.dropout
        if spec.use_dora:
            m_sharding = named_sharding((linear.axes[1],), (out_features,), mesh)
            norms = jax.device_put(_column_norms(linear.weight()), m_sharding)
            linear.lora_magnitude = LoRAParam(norms, logical_axes=(linear.axes[1],))

    for index, block in enumerate(moe_blocks(model) if spec.experts else ()):
        block_key = jax.random.fold_in(key, len(model.layers) * 16 + index)  # after the linears'
        add_expert_adapters(block, spec.rank, spec.scale, block_key)
        for variable in block.expert_lora.values():
            value = variable.get_value()
            variable.set_value(
                jax.device_put(value, named_sharding(variable.logical_axes, value.shape, mesh))
            )


@jax.jit
def _column_norms(kernel: jax.Array) -> jax.Array:
    """||W[:, o]|| per output feature, in float32 (DoRA's initial magnitude)."""
    return jnp.linalg.norm(kernel.astype(jnp.float32), axis=0)


@partial(jax.jit, static_argnames=("shape", "out_sharding"))
def _normal_init(key: jax.Array, shape: tuple[int, int], out_sharding: Any) -> jax.Array:
    """N(0, 0.02) (PEFT's AdaLoRA init of P and Q), made on its devices."""
    values = 0.02 * jax.random.normal(key, shape, jnp.float32)
    return jax.lax.with_sharding_constraint(values, out_sharding)


def parameter_counts(model: CausalLM, trainable: Any) -> tuple[int, int]:
    """(trained, all) parameter counts as PEFT's get_nb_trainable_parameters counts them: a
    quantized kernel counts as its in * out weights, PEFT's AdaLoRA layers hold one more
    (frozen) parameter each, `ranknum`, and a module trained in full beside adapters
    (modules_to_save) is a trained copy beside its frozen original: both count."""
    trained_state = nnx.to_flat_state(nnx.state(model, trainable))
    trained = sum(x.get_value().size for _, x in trained_state)
    everything = TRAINABLE_WITH_VISION  # a vision tower counts, trained or frozen
    total = sum(x.size for x in jax.tree.leaves(nnx.state(model, everything)))  # not buffers
    linears = [linear for _, _, linear in decoder_linears(model)]
    quantized = sum(lin.in_features * lin.out_features for lin in linears if lin.quant is not None)
    ranknums = sum(lin.lora_e is not None for lin in linears)
    adapted = any(lin.lora_a is not None for lin in linears)
    copies = sum(
        x.get_value().size for path, x in trained_state if adapted and path[0] in SAVED_MODULES
    )
    return trained, total + quantized + ranknums + copies


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
    LoRA / QLoRA (sft_jax.objectives.preference); the scales come back on leaving, also on an
    error."""
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
    """A plain model (no adapters, no quantization) with W + scale * A B folded into each kernel
    (A diag(E) B with AdaLoRA; times m / ||W + scale * A B|| per output column with DoRA)."""
    plain = nnx.eval_shape(
        lambda: CausalLM(
            model.config, dtype=model.dtype, param_dtype=model.embed[...].dtype, rngs=nnx.Rngs(0)
        )
    )
    graphdef, abstract, _ = nnx.split(plain, nnx.Param, ...)
    source = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    linears = {(index, name): linear for index, name, linear in decoder_linears(model)}
    values = []
    for path, variable in nnx.to_flat_state(abstract):
        # Kernels of the adaptable projections (not the shared expert of a mixture of experts).
        if path[0] == "layers" and path[-1] == "kernel" and (path[1], path[3]) in linears:
            linear = linears[(path[1], path[3])]
            kernel = linear.adapted_kernel()
            if linear.lora_magnitude is not None:  # DoRA: m / ||W'|| * W' per output column
                kernel = kernel * linear.dora_factor()[None, :]
            value = kernel.astype(variable.get_value().dtype)
        elif path[0] == "layers" and path[-1] in EXPERT_PARAMS:  # with any expert adapters
            block = model.layers[path[1]].mlp
            value = block.expert_weight(path[-1], variable.get_value().dtype)
        else:
            value = source[path].get_value()
        values.append((path, variable.replace(value)))
    # The checkpoint's buffers (Gemma 4's layer scalars) as the model holds them.
    return nnx.merge(graphdef, nnx.from_flat_state(values), nnx.state(model, Buffer))


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
    tensors, rank_pattern, adapted = [], {}, set()
    for index, name, linear in decoder_linears(model):
        if linear.lora_a is None:
            continue
        adapted.add(name)
        prefix = f"base_model.model.{hf_module_name(index, name, model.config)}"
        if linear.lora_e is not None:
            kept = rank_kept(linear)
            rank_pattern[f"{hf_module_name(index, name, model.config)}.lora_E"] = kept.tolist()
            tensors += _svd_tensors(prefix, linear, kept)
            continue
        tensors.append(_pending(f"{prefix}.lora_A.weight", linear.lora_a[...], transpose=True))
        tensors.append(_pending(f"{prefix}.lora_B.weight", linear.lora_b[...], transpose=True))
        if linear.lora_magnitude is not None:
            magnitude = linear.lora_magnitude[...]
            tensors.append(_pending(f"{prefix}.lora_magnitude_vector", magnitude, transpose=False))
    extras = list(spec.extra_trainable)
    if _ties_head(model, spec) and "lm_head" not in extras:
        extras.append("lm_head")  # PEFT ties its copies: the head's must be in the file too
    for module in extras:
        head = model.embed if model.lm_head is None else model.lm_head
        array = {"embed": model.embed, "lm_head": head, "score": model.score}[module][...]
        tensors.append(
            _pending(f"base_model.model.{SAVED_MODULES[module]}.weight", array, transpose=False)
        )
    # PEFT's target_modules: the names this model has ("all-linear" spans every family's).
    spec = dataclasses.replace(spec, targets=tuple(t for t in spec.targets if t in adapted))
    write = jax.process_index() == 0
    if write:
        out_dir.mkdir(parents=True, exist_ok=True)
    for t in tensors if not write else []:
        t.produce()
    if write:
        safetensors_io.write_file(out_dir / "adapter_model.safetensors", tensors, {"format": "pt"})
        config = _adapter_config(spec, base_model, _ties_head(model, spec), rank_pattern)
        if model.config.vision is not None:  # not the vision tower's projections
            config["target_modules"] = vision_io.peft_targets(spec.targets)
        (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out_dir


def _ties_head(model: CausalLM, spec: LoRASpec) -> bool:
    """Whether a trained embedding is also the LM head (tied, and the model has a head)."""
    tied = model.config.tie_word_embeddings and model.score is None
    return tied and bool({"embed", "lm_head"} & set(spec.extra_trainable))


def rank_kept(linear: Any) -> np.ndarray:
    """AdaLoRA: which triplets the layer computes with ([rank] bool): those whose singular
    value is not 0. After the schedule these are exactly the rank allocator's final pattern
    (it holds the others at 0); at any step, dropping the rest leaves the output unchanged."""
    return to_host(linear.lora_e[...]) != 0


def _svd_tensors(prefix: str, linear: Any, kept: np.ndarray) -> list[safetensors_io.PendingTensor]:
    """PEFT's AdaLoRA tensors of a layer, cut to its kept ranks (as PEFT saves them)."""
    rows = np.flatnonzero(kept)

    def pending(name: str, array: jax.Array, cut: Any) -> safetensors_io.PendingTensor:
        shape = np.empty(array.shape, np.bool_)[cut].shape
        return safetensors_io.PendingTensor(
            f"{prefix}.{name}", shape, np.dtype(array.dtype), lambda: to_host(array)[cut]
        )

    lora_a, lora_b = linear.lora_a[...].T, linear.lora_b[...].T  # [rank, in], [out, rank]
    return [
        pending("lora_A", lora_a, (rows, slice(None))),
        pending("lora_E", linear.lora_e[...][:, None], (rows, slice(None))),
        pending("lora_B", lora_b, (slice(None), rows)),
    ]


def _pending(name: str, array: jax.Array, transpose: bool) -> safetensors_io.PendingTensor:
    shape = tuple(array.shape[::-1] if transpose else array.shape)
    dtype = np.dtype(array.dtype)

    def produce() -> np.ndarray:
        host = to_host(array)
        return host.T if transpose else host

    return safetensors_io.PendingTensor(name, shape, dtype, produce)


def _adapter_config(
    spec: LoRASpec, base_model: str, tied: bool, rank_pattern: dict[str, list[bool]]
) -> dict[str, Any]:
    fields = {
        # A trained, tied embedding is also the LM head (as in sft_jax); without this PEFT
        # would keep the head on the old embedding.
        "ensure_weight_tying": tied,
        "peft_type": "LORA",
        # A reward model loads as PeftModelForSequenceClassification (its score head saved).
        "task_type": "SEQ_CLS" if "score" in spec.extra_trainable else "CAUSAL_LM",
        "base_model_name_or_path": base_model or None,
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "use_rslora": spec.use_rslora,
        "target_modules": sorted(spec.targets),
        "modules_to_save": [SAVED_MODULES[m].split(".")[-1] for m in spec.extra_trainable] or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "use_dora": spec.use_dora,
    }
    ada = spec.adalora
    if ada is None:
        return fields
    fields.pop("r")  # AdaLoRA's rank is init_r (PEFT warns on an r it ignores)
    return fields | {
        "peft_type": "ADALORA",
        "init_r": ada.init_r,
        "target_r": ada.target_r,
        "tinit": ada.tinit,
        "tfinal": ada.tfinal,
        "deltaT": ada.delta_t,
        "beta1": ada.beta1,
        "beta2": ada.beta2,
        "orth_reg_weight": ada.orth_reg_weight,
        "total_step": ada.total_step,
        "rank_pattern": rank_pattern,
    }
