"""Hugging Face in and out: load safetensors onto a mesh, export loadable directories."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from sft_jax.core.errors import CheckpointError
from sft_jax.models.config import ModelConfig, from_hf_config
from sft_jax.models.decoder import ATTENTION_NAMES, CausalLM, decoder_linears
from sft_jax.models.io import gemma3_vision as vision_io
from sft_jax.models.io import gpt_oss as gpt_oss_io
from sft_jax.models.io import mxfp4 as mxfp4_io
from sft_jax.models.io import qwen_vl as qwen_vl_io
from sft_jax.models.io import safetensors as safetensors_io
from sft_jax.models.io.config_files import write_config, write_generation_config
from sft_jax.models.io.files import check_safetensors_present, load_hf_config, resolve_model_dir
from sft_jax.models.io.fixed_names import STORED_VARIABLES, fixed_tensor_name, text_model_tensors
from sft_jax.models.layers import Linear
from sft_jax.models.linear_attention import LINEAR_LEAVES, LINEAR_PROJECTIONS
from sft_jax.models.moe import EXPERT_PARAMS
from sft_jax.models.partitioning import named_sharding, single_device_mesh
from sft_jax.models.quantize import QuantSpec, quantize_structure, quantized_kernel
from sft_jax.models.score_head import new_score_head, reward_pad_id, sequence_classification_config

log = logging.getLogger(__name__)

# Buffers some checkpoints carry that are recomputed rather than loaded.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
# Semantic norm names -> Hugging Face names; Gemma's sandwich layout renames the MLP pre-norm.
_NORM_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_post_norm": "post_attention_layernorm",
    "mlp_norm": "post_attention_layernorm",
    "mlp_post_norm": "post_feedforward_layernorm",
}
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3


def hf_tensor_name(path: tuple[Any, ...], config: ModelConfig) -> tuple[str, bool]:
    """Hugging Face tensor name of a parameter path, and whether it is stored transposed."""
    fixed = fixed_tensor_name(path) or vision_io.vision_tensor_name(path, config)  # Gemma 3's
    if fixed is not None:
        return fixed
    if (gpt_oss := gpt_oss_io.tensor_name(path, config)) is not None:
        return gpt_oss  # sinks, its router's weight and bias, its down projections
    if (vision := qwen_vl_io.tensor_name(path)) is not None:
        return vision  # Qwen2.5-VL's visual.*
    _, index, *rest = path
    prefix = f"model.layers.{index}"
    if rest[0] in _NORM_NAMES:
        name = _NORM_NAMES[rest[0]]
        if rest[0] == "mlp_norm" and config.sandwich_norms:
            name = "pre_feedforward_layernorm"
        return f"{prefix}.{name}.weight", False
    linear = config.layer_types[index] == "linear_attention"
    if rest[0] == "attn" and linear and rest[1] in LINEAR_LEAVES:  # Gated DeltaNet parameters
        return f"{prefix}.linear_attn.{LINEAR_LEAVES[rest[1]]}", False
    attention = "linear_attn" if linear else "self_attn"
    module = attention if rest[0] == "attn" else _mlp_module(config)
    if rest[1] in ("router", "router_bias"):  # router_bias: DeepSeek-V3's score-correction bias
        leaf = "weight" if rest[1] == "router" else "e_score_correction_bias"
        return f"{prefix}.{module}.gate.{leaf}", rest[1] == "router"
    leaf = rest[-1]
    # q_norm / k_norm scales, projections, the shared expert's projections and gate.
    inner = ".".join(str(key) for key in rest[1:-1])
    return (
        f"{prefix}.{module}.{inner}.{'bias' if leaf == 'bias' else 'weight'}",
        leaf == "kernel",
    )


def _mlp_module(config: ModelConfig) -> str:
    # Mixtral checkpoints on the hub call the expert block block_sparse_moe.
    return "block_sparse_moe" if config.expert_names == "mixtral" else "mlp"


# Stacked expert parameter -> its per-expert projection name in each checkpoint layout.
_EXPERT_NAMES = {
    "qwen": {"experts_gate": "gate_proj", "experts_up": "up_proj", "experts_down": "down_proj"},
    "mixtral": {"experts_gate": "w1", "experts_up": "w3", "experts_down": "w2"},
}


def hf_expert_names(path: tuple[Any, ...], config: ModelConfig) -> list[str] | None:
    """Per-expert Hugging Face tensor names (each stored [out, in]) of a stacked expert
    parameter [X, in, out], as the hub checkpoints hold them; None for any other parameter."""
    if path[-1] not in EXPERT_PARAMS or config.expert_names not in _EXPERT_NAMES:
        return None  # gpt-oss stores its experts fused (io/gpt_oss.py)
    projection = _EXPERT_NAMES[config.expert_names][path[-1]]
    prefix = f"model.layers.{path[1]}.{_mlp_module(config)}.experts"
    return [f"{prefix}.{e}.{projection}.weight" for e in range(config.num_experts)]


def _load_experts(
    entries: dict[str, safetensors_io.TensorEntry],
    names: list[str],
    target: jax.ShapeDtypeStruct,
    param_sharding: jax.sharding.Sharding,
) -> jax.Array:
    """Stacks per-expert [out, in] tensors into [X, in, out], each device reading only the
    experts and the slice of them it holds."""
    shape = target.shape
    checked = [_checked_entry(entries, name, shape[1:], True) for name in names]

    def read(index: tuple[slice, ...]) -> np.ndarray:
        experts, rows, cols = (range(n)[i] for i, n in zip(index, shape, strict=True))
        box = (slice(cols.start, cols.stop), slice(rows.start, rows.stop))
        return np.stack([checked[e].read(box).T.astype(target.dtype) for e in experts])

    return jax.make_array_from_callback(shape, param_sharding, read).block_until_ready()


def hf_module_name(index: int, name: str, config: ModelConfig | None = None) -> str:
    """Hugging Face module name of projection `name` of decoder layer `index` (in an image-text
    model, under transformers' model.language_model, as PEFT names it)."""
    model = "model.language_model" if config is not None and config.vision else "model"
    if name in LINEAR_PROJECTIONS:
        return f"{model}.layers.{index}.linear_attn.{name}"
    return f"{model}.layers.{index}.{'self_attn' if name in ATTENTION_NAMES else 'mlp'}.{name}"


def abstract_model(
    config: ModelConfig,
    *,
    dtype: Any,
    param_dtype: Any,
    remat: str = "none",
    quantization: QuantSpec | None = None,
) -> CausalLM:
    """The model's structure with ShapeDtypeStructs in place of arrays (nothing allocated)."""
    model = nnx.eval_shape(
        lambda: CausalLM(
            config, dtype=dtype, param_dtype=param_dtype, remat=remat, rngs=nnx.Rngs(0)
        )
    )
    if quantization is not None:
        quantize_structure((linear for _, _, linear in decoder_linears(model)), quantization)
    return model


def _module_at(model: nnx.Module, path: tuple[Any, ...]) -> Any:
    for key in path:
        model = model[key] if isinstance(key, int) else getattr(model, key)
    return model


def _checked_entry(
    entries: dict[str, safetensors_io.TensorEntry],
    name: str,
    shape: tuple[int, ...],
    transposed: bool,
) -> safetensors_io.TensorEntry:
    if name not in entries:
        raise CheckpointError(f"tensor {name} is missing from the checkpoint.")
    entry = entries[name]
    expected = shape[::-1] if transposed else shape
    if entry.shape != expected:
        raise CheckpointError(
            f"{entry.path.name}: tensor {name} has shape {entry.shape}, but config.json implies "
            f"{expected}. The weights do not belong to this config."
        )
    return entry


def _load_quantized(
    entry: safetensors_io.TensorEntry, linear: Any, param_dtype: Any, mesh: Mesh
) -> dict[str, jax.Array]:
    """Loads one kernel in full precision, quantizes it on its devices, drops the original."""
    shape = (linear.in_features, linear.out_features)
    if entry.shape != shape[::-1]:
        raise CheckpointError(f"{entry.path.name}: kernel shape {entry.shape} != {shape[::-1]}.")
    kernel_sharding = named_sharding(linear.axes, shape, mesh)
    kernel = _load_param(entry, True, jax.ShapeDtypeStruct(shape, param_dtype), kernel_sharding)
    stored = quantized_kernel(kernel, linear.quant_spec, linear.axes, mesh)
    kernel.delete()
    return jax.block_until_ready(stored)


def _bounding_box(indices: list[tuple[slice, ...]], shape: tuple[int, ...]) -> tuple[slice, ...]:
    """The smallest box holding every slice in `indices` (all addressable shards of a process)."""
    box = []
    for axis, size in enumerate(shape):
        ranges = [range(size)[index[axis]] for index in indices]
        box.append(slice(min(r.start for r in ranges), max(r.stop for r in ranges)))
    return tuple(box)


def _load_param(
    entry: safetensors_io.TensorEntry,
    transposed: bool,
    target: jax.ShapeDtypeStruct,
    param_sharding: jax.sharding.Sharding,
) -> jax.Array:
    """Reads this process's part of a tensor once and hands each local device its slice."""
    indices = list(param_sharding.addressable_devices_indices_map(target.shape).values())
    box = _bounding_box(indices, target.shape)
    # Kernels are stored [out, in] on disk.
    local = entry.read(box[::-1]).T if transposed else entry.read(box)
    local = local.astype(target.dtype, copy=False)

    def read(index: tuple[slice, ...]) -> np.ndarray:
        relative = tuple(
            slice(r.start - b.start, r.stop - b.start)
            for r, b in zip(
                (range(n)[i] for i, n in zip(index, target.shape, strict=True)), box, strict=True
            )
        )
        return np.ascontiguousarray(local[relative])

    array = jax.make_array_from_callback(target.shape, param_sharding, read)
    # Transfers are asynchronous: wait, so that host slices of one tensor at a time are alive.
    return array.block_until_ready()


def from_pretrained(
    name_or_path: str | Path,
    *,
    mesh: Mesh | None = None,
    param_dtype: Any = jnp.float32,
    dtype: Any = None,
    remat: str = "none",
    quantization: QuantSpec | None = None,
    attention: str = "xla",
    max_segments: int = 0,
    score_labels: int | None = None,
) -> CausalLM:
    """Loads a Hugging Face causal LM directory (or hub id) into a CausalLM sharded on `mesh`.

    param_dtype is the storage dtype of the parameters, dtype the compute dtype (defaults to
    param_dtype), remat the activation checkpointing policy of the decoder layers. Every tensor
    goes straight from disk to its devices, slice by slice. With `quantization` (QLoRA) each
    decoder kernel is quantized on its devices as soon as it is loaded, so at most one kernel
    is ever held in full precision. score_labels=N loads it as a reward model with N outputs
    (a causal LM's checkpoint gets a new `score` head, as transformers'
    *ForSequenceClassification.from_pretrained initializes it); None: as the checkpoint is.
    """
    model_dir = resolve_model_dir(name_or_path)
    hf_config = load_hf_config(model_dir)
    config = dataclasses.replace(
        from_hf_config(hf_config), attention=attention, max_segments=max_segments
    )
    if score_labels is not None:
        config = dataclasses.replace(config, score_labels=score_labels)
    check_safetensors_present(model_dir)
    try:
        entries = safetensors_io.read_checkpoint(model_dir)
        read = vision_io.checkpoint_tensors if vision_io.is_gemma3(config) else text_model_tensors
        entries = read(entries)
    except safetensors_io.CheckpointFormatError as e:
        raise CheckpointError(str(e)) from e
    if (config.hf_config.get("quantization_config") or {}).get("quant_method") == "mxfp4":
        entries = mxfp4_io.dequantized_entries(entries, np.dtype(param_dtype))  # gpt-oss experts
    mesh = mesh or single_device_mesh()
    model = abstract_model(
        config,
        dtype=dtype or param_dtype,
        param_dtype=param_dtype,
        remat=remat,
        quantization=quantization,
    )
    graphdef, abstract_state = nnx.split(model)
    loaded, used = _load_variables(model, abstract_state, entries, mesh, param_dtype)
    unused = sorted(
        n
        for n in set(entries) - used
        if not n.endswith(_IGNORED_SUFFIXES)
        and not (n == "lm_head.weight" and (config.tie_word_embeddings or config.score_labels))
    )
    if unused:
        log.warning("%s: %d tensors not used by sft_jax: %s", model_dir, len(unused), unused[:8])
    return nnx.merge(graphdef, nnx.from_flat_state(loaded))


def _load_variables(
    model: CausalLM,
    abstract_state: nnx.State,
    entries: dict[str, safetensors_io.TensorEntry],
    mesh: Mesh,
    param_dtype: Any,
) -> tuple[list[tuple[Any, Any]], set[str]]:
    """(path, loaded variable) of every variable of the abstract model, and the tensor names
    read; quantized kernels are loaded and quantized one at a time."""
    loaded, used, quantized = [], set(), {}
    for path, variable in nnx.to_flat_state(abstract_state):
        if "quant" in path:
            linear_path = path[: path.index("quant")]
            if linear_path not in quantized:
                name, _ = hf_tensor_name((*linear_path, "kernel"), model.config)
                quantized[linear_path] = _load_quantized(
                    entries[name], _module_at(model, linear_path), param_dtype, mesh
                )
                used.add(name)
            loaded.append((path, variable.replace(quantized[linear_path][path[-1]])))
            continue
        target = variable.get_value()
        param_sharding = named_sharding(variable.get_metadata()["logical_axes"], target.shape, mesh)
        expert_names = hf_expert_names(path, model.config)
        if expert_names is not None:
            array = _load_experts(entries, expert_names, target, param_sharding)
            loaded.append((path, variable.replace(array)))
            used.update(expert_names)
            continue
        if (fused := gpt_oss_io.interleaved(path, model.config)) is not None:
            name, offset = fused  # the gate or up half of gate_up_proj (or of its bias)
            shape = (*target.shape[:-1], 2 * target.shape[-1])
            entry = _checked_entry(entries, name, shape, False)
            array = gpt_oss_io.load_interleaved(entry, offset, target, param_sharding)
            loaded.append((path, variable.replace(array)))
            used.add(name)
            continue
        if path == qwen_vl_io.PATCH_EMBED:  # stored as a 3-D convolution's weight
            array, name = qwen_vl_io.load_patch_embed(
                entries, target, param_sharding, CheckpointError
            )
            loaded.append((path, variable.replace(array)))
            used.add(name)
            continue
        name, transposed = hf_tensor_name(path, model.config)
        if name == "score.weight" and name not in entries:
            loaded.append((path, variable.replace(new_score_head(target, param_sharding))))
            continue
        entry = _checked_entry(entries, name, target.shape, transposed)
        loaded.append(
            (path, variable.replace(_load_param(entry, transposed, target, param_sharding)))
        )
        used.add(name)
    return loaded, used


def to_host(array: jax.Array) -> np.ndarray:
    if array.is_fully_addressable:
        return np.asarray(array)
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def _pending_tensors(
    model: CausalLM, out_dtype: np.dtype | None
) -> Iterator[safetensors_io.PendingTensor]:
    for path, variable in nnx.to_flat_state(nnx.state(model, STORED_VARIABLES)):
        array = variable.get_value()
        expert_names = hf_expert_names(path, model.config)
        if expert_names is not None:  # the hub layout: one [out, in] tensor per expert
            yield from _expert_tensors(array, expert_names, out_dtype)
            continue
        if gpt_oss_io.interleaved(path, model.config):  # gate and up into gate_up_proj
            yield from gpt_oss_io.interleaved_tensors(model, path, out_dtype, to_host)
            continue
        if path == qwen_vl_io.PATCH_EMBED:
            yield qwen_vl_io.patch_embed_tensor(array, model.config.vision, out_dtype, to_host)
            continue
        name, transposed = hf_tensor_name(path, model.config)
        if vision_io.is_gemma3(model.config):  # Gemma 3's hub layout
            name = vision_io.hub_name(name)
        dtype = np.dtype(out_dtype or array.dtype)
        shape = tuple(array.shape[::-1] if transposed else array.shape)

        def produce(array=array, transposed=transposed, dtype=dtype) -> np.ndarray:
            host = to_host(array).astype(dtype)
            return host.T if transposed else host

        yield safetensors_io.PendingTensor(name, shape, dtype, produce)


def _expert_tensors(
    array: jax.Array, names: list[str], out_dtype: np.dtype | None
) -> Iterator[safetensors_io.PendingTensor]:
    dtype = np.dtype(out_dtype or array.dtype)
    for expert, name in enumerate(names):

        def produce(expert=expert) -> np.ndarray:
            return to_host(array[expert]).astype(dtype).T

        yield safetensors_io.PendingTensor(name, tuple(array.shape[:0:-1]), dtype, produce)


def save_pretrained(
    model: CausalLM,
    out_dir: str | Path,
    *,
    hf_config: dict[str, Any] | None = None,
    tokenizer: Any = None,
    generation_config_from: str | Path | None = None,
    dtype: Any = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Writes a directory that transformers.AutoModelForCausalLM.from_pretrained loads as is
    (AutoModelForSequenceClassification for a reward model).

    Every process must call this (arrays sharded across hosts are gathered tensor by tensor);
    only process 0 writes. `dtype` converts the weights (default: their own dtype).
    """
    out_dir = Path(out_dir)
    hf_config = dict(hf_config or model.config.hf_config)
    hf_config.pop("quantization_config", None)  # MXFP4 experts are written dequantized
    if not hf_config:
        raise ValueError("save_pretrained needs the model's Hugging Face config (hf_config=...).")
    linears = [n for _, n in nnx.iter_graph(model) if isinstance(n, Linear)]  # vision's too
    if any(n.lora_a is not None or n.quant is not None for n in linears):
        raise ValueError(
            "save_pretrained writes plain weights: fold the adapters (and dequantize) first, "
            "with sft_jax.adapters.lora.merged(model)."
        )
    if model.config.score_labels:
        pad = reward_pad_id(getattr(tokenizer, "pad_token_id", None), hf_config)
        hf_config = sequence_classification_config(hf_config, model.config.score_labels, pad)
    writer = jax.process_index() == 0
    tensors = list(_pending_tensors(model, np.dtype(dtype) if dtype is not None else None))
    if writer:
        out_dir.mkdir(parents=True, exist_ok=True)
        for stale in [*out_dir.glob("*.safetensors"), out_dir / safetensors_io.INDEX_FILE]:
            stale.unlink(missing_ok=True)
    safetensors_io.write_checkpoint(out_dir, tensors, max_shard_bytes, write=writer)
    if not writer:
        return out_dir
    hf_config["dtype"] = str(np.dtype(tensors[0].dtype)) if tensors else "float32"
    write_config(out_dir, hf_config)
    write_generation_config(out_dir, hf_config, generation_config_from)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return out_dir
