"""Every check of a run spec's values, section by section, made once at the entry point."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax

from sft_jax.adapters import vision_lora
from sft_jax.adapters.lora import names
from sft_jax.core.errors import ConfigError, check_choice, need, value_at
from sft_jax.data.formats import FORMATS
from sft_jax.data.loader_choice import LOADERS
from sft_jax.data.mixture import CONTAMINATION, SOURCE_FIELDS
from sft_jax.data.spans import TRAIN_REASONING
from sft_jax.data.templates import TRAIN_ON
from sft_jax.data.tokenize import EMPTY_REPLIES, OVERLONG
from sft_jax.models import DTYPES
from sft_jax.models.decoder import REMAT_POLICIES
from sft_jax.objectives import registry
from sft_jax.train import adapter_checks, vision_checks
from sft_jax.train.kernel_choice import ATTENTION_CHOICES, MOE_DISPATCH_CHOICES
from sft_jax.train.memory import host_offload_supported
from sft_jax.train.optim import SCHEDULES

REMAT_CHOICES = (*REMAT_POLICIES, "auto")  # the decoder's policies, or the compiler's pick


def check_values(config: Any, device_count: int, batch_shards: int) -> None:
    """Every allowed-value check of a run's config, made once before anything loads: values
    that would fail deep inside (or silently) later, named now with what to do. The modules
    that read these values trust them.

    batch_shards: devices the batch rows are split over (mesh data x fsdp x expert).
    """
    _check_train(config)
    _check_batches(config, device_count, batch_shards)
    _check_data(config)
    _check_eval_and_outputs(config)
    _check_model(config)
    _check_context(config)
    adapter_checks.check_lora(config)
    adapter_checks.check_prompt(config)
    _check_objective(config)
    vision_checks.check_image_run(config)  # what images do not combine with yet


def check_tokenizer_fits(tokenizer: Any, model_config: Any) -> None:
    """The run's tokenizer has no id past the model's vocabulary."""
    if tokenizer is not None and len(tokenizer) > model_config.vocab_size:
        raise ConfigError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary only "
            f"{model_config.vocab_size}: ids past it would index nothing. Use the model's own "
            "tokenizer (config.data.tokenizer='') or resize the model's embeddings first."
        )


def check_for_model(config: Any, model_config: Any, expert_devices: int) -> None:
    """Values that depend on the checkpoint: the expert mesh axis (expert_devices, as
    resolved) must divide its experts."""
    experts = model_config.num_experts
    _need(
        config,
        expert_devices == 1 or (experts > 0 and experts % expert_devices == 0),
        "mesh.expert",
        f"an expert axis of {expert_devices} devices must divide the model's "
        f"number of experts ({experts}; a dense model has none: use mesh.data or mesh.fsdp).",
    )
    context = config.mesh.context
    _need(
        config,
        context == 1 or experts == 0,
        "mesh.context",
        f"context parallelism (mesh.context={context}) is not built for mixtures of experts "
        f"({model_config.model_type}) yet: use mesh.context=1.",
    )
    lora = config.lora
    for field in ("expert_adapters", "train_router"):
        _need(
            config,
            experts > 0 or not getattr(lora, field),
            f"lora.{field}",
            "applies to mixtures of experts; this model is dense: set it to False.",
        )
    if lora.rank > 0:  # the names this model's vision part has (a ConfigError naming them)
        vision_lora.resolve(names(lora.vision_targets), model_config)


_need = need


def check_mesh(config: Any) -> None:
    """config.mesh before a mesh is built from it (the planner's fields included)."""
    mesh = config.mesh
    _need(config, isinstance(mesh.auto, bool), "mesh.auto", "expected True or False.")
    sizes = [mesh.data, mesh.fsdp, mesh.tensor]
    _need(
        config,
        all(s == -1 or s > 0 for s in sizes) and sizes.count(-1) <= 1,
        "mesh.data",
        f"data, fsdp, tensor = {sizes}: positive sizes, at most one -1 (the rest of the "
        "devices); or config.mesh.auto=True to let the planner choose.",
    )
    context = mesh.context
    _need(
        config,
        isinstance(context, int) and context >= 1,
        "mesh.context",
        "devices the sequence is split over: 1 (off) or more.",
    )


def _check_train(config: Any) -> None:
    train = config.train
    _need(config, train.steps > 0, "train.steps", "train for at least one step.")
    _need(config, train.learning_rate > 0, "train.learning_rate", "must be positive.")
    _need(config, train.warmup_steps >= 0, "train.warmup_steps", "must be 0 or more.")
    _need(config, 0 <= train.min_lr_ratio <= 1, "train.min_lr_ratio", "must be within [0, 1].")
    _need(config, train.max_grad_norm >= 0, "train.max_grad_norm", "must be 0 (off) or positive.")
    _need(config, train.loss_chunk_size > 0, "train.loss_chunk_size", "must be positive.")
    _need(
        config,
        train.router_aux_loss_coef == -1 or train.router_aux_loss_coef >= 0,
        "train.router_aux_loss_coef",
        "must be -1 (the checkpoint's) or 0 or more.",
    )
    _need(
        config, train.router_z_loss_weight >= 0, "train.router_z_loss_weight", "must be 0 or more."
    )
    check_choice("train.lr_schedule", train.lr_schedule, SCHEDULES)
    accumulation = train.gradient_accumulation_steps
    _need(config, accumulation > 0, "train.gradient_accumulation_steps", "must be 1 or more.")


def _check_batches(config: Any, device_count: int, batch_shards: int) -> None:
    accumulation = config.train.gradient_accumulation_steps
    for field, pieces in (("train.global_batch_size", accumulation), ("eval.global_batch_size", 1)):
        rows = value_at(config, field)
        split = f"{pieces} micro-batches x " if pieces > 1 else ""
        _need(
            config,
            rows > 0 and rows % (pieces * batch_shards) == 0,
            field,
            f"rows must split evenly into {split}{batch_shards} devices (the mesh's data x fsdp "
            f"x expert axes, of {device_count} devices): use a multiple of "
            f"{pieces * batch_shards}.",
        )


def _check_data(config: Any) -> None:
    data = config.data
    _need(config, data.max_length > 1, "data.max_length", "rows need at least 2 tokens.")
    _need(config, data.prefetch >= 1, "data.prefetch", "prefetch at least 1 batch.")
    _need(
        config,
        data.max_documents_per_row >= 0,
        "data.max_documents_per_row",
        "must be 0 (no limit) or positive.",
    )
    _need(config, data.max_images_per_row >= 1, "data.max_images_per_row", "at least 1.")
    _need(
        config,
        data.max_image_patches_per_row >= 1,
        "data.max_image_patches_per_row",
        "at least 1.",
    )
    _need(config, 0.0 <= data.eval_fraction < 1.0, "data.eval_fraction", "expected [0, 1).")
    check_choice("data.train_on", data.train_on, TRAIN_ON)
    check_choice("data.train_reasoning", data.train_reasoning, TRAIN_REASONING)
    _need(
        config,
        _is_json_object(data.template_kwargs),
        "data.template_kwargs",
        "expected '' or a JSON object, e.g. '{\"enable_thinking\": false}'.",
    )
    check_choice("data.format", data.format, ("auto", *FORMATS))
    check_choice("data.empty_replies", data.empty_replies, EMPTY_REPLIES)
    check_choice("data.overlong", data.overlong, OVERLONG)
    _check_stream(config)


def _check_stream(config: Any) -> None:
    """The stream loader's fields: the mixture's entries, the window, contamination."""
    data = config.data
    check_choice("data.loader", data.loader, LOADERS)
    check_choice("data.contamination", data.contamination, CONTAMINATION)
    stream = data.loader == "stream"
    _need(config, data.stream_window >= 1, "data.stream_window", "at least 1 document.")
    _need(
        config,
        data.loader != "memory" or not (data.mixture or data.contamination != "off"),
        "data.loader",
        "a mixture and the contamination check need loader='stream' (or 'auto').",
    )
    objective = registry.kind_of(config)
    _need(
        config,
        not stream or objective.reads == "examples",
        "data.loader",
        f"train.objective={objective.name!r} trains on preference pairs, which only "
        "loader='memory' reads: set config.data.loader='memory' (no mixture).",
    )
    _need(
        config,
        not (stream and data.eval_fraction),
        "data.eval_fraction",
        "the stream loader does not split eval examples off train_files: set 0 and give "
        "config.data.eval_files (in a mixture, each source's eval_files), or use "
        "loader='memory'.",
    )
    names: set[str] = set()
    for number, entry in enumerate(data.mixture):
        names.add(_check_source(number, entry, names))


def _check_source(number: int, entry: Any, names: set[str]) -> str:
    """One entry of config.data.mixture; returns its name."""
    field = f"data.mixture[{number}]"
    entry = dict(entry) if isinstance(entry, Mapping) else entry

    def need(ok: bool, where: str, value: Any, problem: str) -> None:
        if not ok:
            raise ConfigError(f"config.{where}={value!r}: {problem}")

    need(
        isinstance(entry, dict) and "train_files" in entry,
        field,
        entry,
        "a dict with at least train_files (and name, weight).",
    )
    unknown = sorted(set(entry) - set(SOURCE_FIELDS))
    need(not unknown, field, entry, f"unknown keys {unknown}; known: {', '.join(SOURCE_FIELDS)}.")
    weight = entry.get("weight", 1.0)
    need(
        isinstance(weight, int | float) and weight > 0,
        f"{field}.weight",
        weight,
        "a positive number.",
    )
    name = str(entry.get("name", f"source{number}"))
    need(
        name not in names and "/" not in name,
        f"{field}.name",
        name,
        "names must be unique and hold no '/' (they name eval/<name>/loss).",
    )
    if "format" in entry:
        check_choice(f"{field}.format", entry["format"], ("auto", *FORMATS))
    if "template_kwargs" in entry:
        need(
            _is_json_object(entry["template_kwargs"]),
            f"{field}.template_kwargs",
            entry["template_kwargs"],
            "a JSON object (or '').",
        )
    return name


def _check_eval_and_outputs(config: Any) -> None:
    _need(config, config.log.every_steps > 0, "log.every_steps", "log at least every N > 0 steps.")
    config.log.tracker_names()  # each one known
    for field in (
        "eval.every_steps",
        "checkpoint.every_steps",
        "eval.generate_examples",
        "eval.show_samples",
        "eval.early_stopping_patience",
        "eval.harness_limit",
    ):
        _need(config, value_at(config, field) >= 0, field, "must be 0 (off) or positive.")
    _need(config, config.eval.max_new_tokens > 0, "eval.max_new_tokens", "must be positive.")
    _need(config, config.checkpoint.keep_last >= 1, "checkpoint.keep_last", "keep at least 1.")
    _need(
        config,
        "://" not in config.checkpoint.staging_dir,
        "checkpoint.staging_dir",
        "the staging copy of a bucket WORKDIR must be a local (or shared, mounted) directory; "
        "the bucket is --workdir itself.",
    )
    _need(
        config,
        config.export.at_end in ("best", "last", "none"),
        "export.at_end",
        "expected 'best', 'last' or 'none'.",
    )
    _need(
        config,
        config.checkpoint.enabled or config.export.at_end == "none",
        "export.at_end",
        "the export is written from a checkpoint, but config.checkpoint.enabled is False: "
        "enable checkpoints or set config.export.at_end='none'.",
    )


def _check_context(config: Any) -> None:
    """mesh.context: it splits each row into 2 x context chunks (causal load balancing), and
    only kernels that take tokens out of order can attend over them."""
    context = config.mesh.context
    if context == 1:
        return
    _need(
        config,
        config.data.max_length % (2 * context) == 0,
        "data.max_length",
        f"mesh.context={context} splits every row into 2 x {context} equal chunks (two per "
        f"device, for an equal share of causal work): use a multiple of {2 * context}.",
    )
    _need(
        config,
        config.model.attention != "splash",
        "model.attention",
        f"splash attention cannot run with the sequence split over mesh.context={context} "
        "(its causal tiles assume tokens in order): use 'blockwise' (flash-style, any "
        "backend), 'auto', 'cudnn' or 'xla', or mesh.context=1.",
    )
    _need(
        config,
        registry.kind_of(config).context_axis,
        "train.objective",
        f"mesh.context={context} is built for SFT only so far: use mesh.context=1.",
    )


def _check_model(config: Any) -> None:
    model = config.model
    _need(
        config,
        model.remat in REMAT_CHOICES,
        "model.remat",
        f"expected {', '.join(map(repr, REMAT_CHOICES[:-1]))} or {REMAT_CHOICES[-1]!r}.",
    )
    _need(
        config,
        model.remat != "offload" or host_offload_supported(),
        "model.remat",
        f"offloading activations needs pinned host memory apart from the device's, which "
        f"the {jax.default_backend()} backend does not have (the policy would move nothing): "
        "use 'full' or 'save_matmuls' here, 'offload' on GPUs and TPUs.",
    )
    check_choice("model.attention", model.attention, ATTENTION_CHOICES)
    check_choice("model.moe_dispatch", model.moe_dispatch, MOE_DISPATCH_CHOICES)
    check_choice("model.param_dtype", model.param_dtype, tuple(DTYPES))
    check_choice("model.compute_dtype", model.compute_dtype, tuple(DTYPES))


def _check_objective(config: Any) -> None:
    """config.train.objective, then the sections its objective owns (objectives/registry.py)."""
    registry.kind_of(config).check(config)


def _is_json_object(text: str) -> bool:
    import json

    if not text:
        return True
    try:
        return isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
        return False
