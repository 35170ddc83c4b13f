"""What a run trains, from its config: the model (loaded, optionally quantized, with adapters),
its objective (objectives/registry.py) and its data.

The attention kernel and remat policy are not chosen here: sft_jax.train.compiled decides both
once it knows the data and the device.
"""

from __future__ import annotations

import logging
from typing import Any

from flax import nnx
from jax.sharding import Mesh

from sft_jax.adapters import methods as adapter_methods
from sft_jax.adapters.base_model import load_base_model
from sft_jax.adapters.lora import LoRASpec
from sft_jax.adapters.prompts import PromptSpec, trainable_line
from sft_jax.core.errors import ConfigError
from sft_jax.core.spec import SAVED_BEFORE_THE_FIELD, RunSpec
from sft_jax.data import (
    DataSource,
    loader_choice,
    open_data,
    open_pair_data,
    open_stream_data,
    run_tokenizer,
    vision_source,
    vision_stream,
)
from sft_jax.data.prompts import open_prompt_data
from sft_jax.models import CausalLM
from sft_jax.models.layers import TRAINABLE, TRAINABLE_WITH_VISION
from sft_jax.objectives import ppo_run, registry
from sft_jax.train.config_check import check_for_model
from sft_jax.train.step import Objective

log = logging.getLogger(__name__)


def score_labels(config: RunSpec) -> int | None:
    """A reward model's outputs (1: a scalar score head); None: the checkpoint's own head."""
    return registry.kind_of(config).score_labels


def build_model(config: RunSpec, mesh: Mesh) -> tuple[CausalLM, LoRASpec, Any]:
    """(model on the mesh, its LoRA spec, the filter of what training updates)."""
    model = load_base_model(
        config,
        config.model.name_or_path,
        mesh,
        lambda loaded: check_for_model(config, loaded, mesh.shape["expert"]),
        score_labels=score_labels(config),
    )
    tokenizer = None
    if PromptSpec.from_config(config).init == "text":
        tokenizer = run_tokenizer(config)
    spec, trainable = add_adapters(model, config, mesh, tokenizer)
    if registry.kind_of(config).value_head:  # PPO's critic: trained whatever else trains
        trainable = nnx.Any(trainable, ppo_run.attach_critic(config, model, mesh))
    model.embedding_noise = config.train.neftune_noise_alpha
    log.info("%s (as PEFT's print_trainable_parameters)", trainable_line(model, trainable))
    return model, spec, trainable


def add_adapters(
    model: CausalLM, config: RunSpec, mesh: Mesh, tokenizer: Any = None
) -> tuple[LoRASpec, Any]:
    """Puts the run's adapters on `model` (adapters/methods.py: LoRA, DoRA, AdaLoRA; or a
    prompt method's module) and returns (its LoRA spec, the filter of what trains): the one
    partition of trained and frozen parameters, shared by training and the planner (which calls
    it on an abstract model under nnx.eval_shape). `tokenizer`: for prompt tuning's text init
    only."""
    # Full fine-tuning: every parameter but frozen buffers (and a vision part unless asked).
    trainable = TRAINABLE_WITH_VISION if config.model.train_vision else TRAINABLE
    methods = adapter_methods.enabled_methods(config)
    if model.vision is not None and config.model.train_vision and methods:
        raise ConfigError(
            "config.model.train_vision=True with adapters: an adapter's export cannot hold the "
            "vision tower's weights yet; train it with full fine-tuning, or set it False."
        )
    for method in methods:
        trainable = method.add(model, config, mesh, tokenizer)
    return adapter_methods.lora_spec(config, model), trainable


def open_run_data(config: RunSpec, feed: tuple[int, int] | None = None) -> DataSource:
    """The run's data (main.py's data factory): preference pairs for an objective that reads
    them, else SFT examples, in memory or streamed. feed: (block, blocks) of each global
    batch's rows this process feeds (sharding.row_feed; the trainer passes it), else each
    process its own block."""
    reads = registry.kind_of(config).reads
    if reads == "pairs":
        return open_pair_data(config, feed)
    if reads == "prompts":
        return open_prompt_data(config, feed)
    images = vision_source.has_images(config)  # an image-text model's rows
    config = with_loader(config)  # "auto": chosen (and logged) here
    if images:
        if config.data.loader == "stream":
            return vision_stream.open_vision_stream(config, feed)
        return vision_source.open_vision_data(config, feed)
    if config.data.loader == "stream":
        return open_stream_data(config, feed)
    return open_data(config, feed)


def with_loader(config: RunSpec, saved: dict[str, Any] | None = None) -> RunSpec:
    """`config` with config.data.loader made concrete where SFT examples are read ("auto" ->
    loader_choice.choose: `saved`, the config of the checkpoint a run resumes, keeps the loader
    it was trained with; one saved before the field existed meant "memory")."""
    if config.data.loader != "auto" or registry.kind_of(config).reads != "examples":
        return config
    loader = ""
    if saved is not None:
        loader = saved.get("data", {}).get("loader", SAVED_BEFORE_THE_FIELD["data.loader"])
    return loader_choice.choose(config, loader)


def moe_options(train: Any, model_config: Any) -> dict[str, Any]:
    """The StepOptions of a mixture of experts (none for a dense model)."""
    if not model_config.moe_layers:
        return {}
    coef = train.router_aux_loss_coef
    return {
        "moe_layers": model_config.moe_layers,
        "router_aux_loss_coef": model_config.router_aux_loss_coef if coef == -1 else coef,
        "router_z_loss_weight": train.router_z_loss_weight,
    }


def image_options(config: RunSpec, model_config: Any) -> dict[str, Any]:
    """The StepOptions of an image-text model's rows at config.data's image budget (none for a
    text model): what the planner compiles, as a run with images does."""
    return vision_source.step_images(vision_source.budget_layout(config, model_config))


def objective_for(
    config: RunSpec,
    model: CausalLM,
    max_segments: int,
    pad_token_id: int | None,
) -> Objective | None:
    """config.train.objective's objective (objectives/registry.py); None for SFT
    (StepOptions.objective: cross-entropy, with the router's losses on a mixture of experts).
    DPO with a frozen copy of the weights as its reference attaches that copy to the model."""
    chosen = registry.build(config, model, max_segments, pad_token_id)
    if chosen is not None:
        log.info("objective: %s, %s", registry.name_of(config), chosen)
    return chosen
