"""The adapter protocol: what a family of parameter-efficient methods gives the rest of a run,
and the registry of the families. Setup, the planner, checkpoint compatibility, export and
the trainer's accounting go through it; only this module knows which families exist.

A new method is a module in adapters/ (its slots on `models/layers.Linear` or the decoder's
hooks) and one `register(AdapterMethod(...))` call below, with its config checks in
train/adapter_checks.py.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jax.sharding import Mesh

from sft_jax.adapters import lora, prompts
from sft_jax.core.registry import Registry
from sft_jax.models import CausalLM

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class AdapterMethod:
    """A family of adapter methods, as the rest of a run sees it."""

    name: str
    # The config fields that decide its parameters: a resumed run (or one that takes another
    # run's parameters) must share them (workdir/compatibility.py).
    fields: tuple[str, ...]
    enabled: Callable[[Any], bool]
    # add(model, config, mesh, tokenizer) puts its parameters on the model and returns the
    # filter of what trains (nnx); tokenizer: for an init from text, else None.
    add: Callable[[CausalLM, Any, Mesh, Any], Any]
    # export(model, config, out) writes its PEFT adapter under `out` and returns the model to
    # save at `out` in Hugging Face's layout (merged into the weights, or the base to load it
    # on) and what was written, for the log.
    export: Callable[[CausalLM, Any, Path], tuple[CausalLM, str]]
    # The PEFT adapter types an export leaves to load at inference (none where the export is
    # merged into the weights), and load(model, adapter_dir) -> what it put on the model.
    peft_types: tuple[str, ...] = ()
    load: Callable[[CausalLM, Path], str] | None = None


METHODS: Registry[AdapterMethod] = Registry("adapter family")


def register(method: AdapterMethod) -> AdapterMethod:
    return METHODS.register(method.name, method)


def methods() -> tuple[AdapterMethod, ...]:
    return tuple(METHODS)


def enabled_methods(config: Any) -> tuple[AdapterMethod, ...]:
    """The families this config turns on (config_check allows one at a time)."""
    return tuple(m for m in METHODS if m.enabled(config))


def for_peft_type(peft_type: Any) -> AdapterMethod | None:
    """The family whose exports leave adapters of this PEFT type to load (chat), else None."""
    return next((m for m in METHODS if peft_type in m.peft_types), None)


def fields() -> tuple[str, ...]:
    """Every family's fields: what a checkpoint's adapters are shaped by."""
    return tuple(f for m in METHODS for f in m.fields)


# --- LoRA, QLoRA, DoRA, AdaLoRA (config.lora) ------------------------------------------------


def lora_spec(config: Any, model: CausalLM | None = None) -> lora.LoRASpec:
    """config.lora as a spec; with `model`, resolved for it (tied heads, a reward model)."""
    spec = lora.LoRASpec.from_config(config.lora, config.train.steps)
    return spec.for_model(model) if spec.enabled and model is not None else spec


def _add_lora(model: CausalLM, config: Any, mesh: Mesh, tokenizer: Any) -> Any:
    spec = lora_spec(config)
    applied = spec.for_model(model)
    if "embed" in set(applied.extra_trainable) - set(spec.extra_trainable):
        log.info(
            "config.lora.trainable_modules: the LM head is tied to the embedding, so "
            "the embedding matrix (model.embed_tokens) is trained"
        )
    if model.score is not None:
        log.info(
            "reward model: the new score head trains in full beside the adapters "
            "(PEFT's modules_to_save=['score'])"
        )
    lora.apply_lora(model, applied, mesh, seed=config.train.seed)
    return lora.trainable_filter(applied)


def _export_lora(model: CausalLM, config: Any, out: Path) -> tuple[CausalLM, str]:
    """The PEFT adapter in out/adapter (expert adapters have no PEFT form) and the merged
    model for out."""
    spec = lora_spec(config, model)
    if spec.experts:
        log.info("config.lora.expert_adapters: no PEFT adapter, the merged model only")
        return lora.merged(model), "merged model"
    lora.save_adapter(model, out / "adapter", spec, base_model=config.model.name_or_path)
    return lora.merged(model), "merged model, adapter in adapter/"


register(
    AdapterMethod(
        "lora",
        fields=(
            "lora.rank",
            "lora.target_modules",
            "lora.trainable_modules",
            "lora.quantize",
            "lora.quant_block_size",
            "lora.double_quant",
            "lora.use_dora",
            "lora.method",
            "lora.expert_adapters",
            "lora.train_router",
            "lora.vision_targets",
        ),
        enabled=lambda config: lora_spec(config).enabled,
        add=_add_lora,
        export=_export_lora,
    )
)


# --- Prompt tuning, P-tuning, prefix tuning (config.prompt) ---------------------------------


def _add_prompt(model: CausalLM, config: Any, mesh: Mesh, tokenizer: Any) -> Any:
    spec = prompts.PromptSpec.from_config(config)
    if spec.init == "text" and tokenizer is None:  # the shapes are those of any init
        spec = dataclasses.replace(spec, init="random")
    prompts.apply_prompt(model, spec, seed=config.train.seed, tokenizer=tokenizer)
    return prompts.trainable_filter()


def _export_prompt(model: CausalLM, config: Any, out: Path) -> tuple[CausalLM, str]:
    """Virtual tokens or prefixes cannot be merged into weights: the PEFT adapter in
    out/adapter, and the unchanged base model to load it on."""
    spec = prompts.PromptSpec.from_config(config)
    base = config.model.name_or_path
    prompts.save_prompt_adapter(model, out / "adapter", spec, base_model=base)
    model.virtual_tokens, model.kv_prefix = None, None
    return model, "PEFT adapter in adapter/ on the base model"


def _load_prompt(model: CausalLM, adapter_dir: Path) -> str:
    spec = prompts.load_prompt_adapter(model, adapter_dir)
    return f"{spec.method} adapter of {spec.num_virtual_tokens} virtual tokens"


register(
    AdapterMethod(
        "prompt",
        fields=(
            "prompt.method",
            "prompt.num_virtual_tokens",
            "prompt.encoder_type",
            "prompt.encoder_hidden_size",
            "prompt.encoder_num_layers",
            "prompt.prefix_projection",
        ),
        enabled=lambda config: prompts.PromptSpec.from_config(config).enabled,
        add=_add_prompt,
        export=_export_prompt,
        peft_types=tuple(prompts.PEFT_TYPES.values()),
        load=_load_prompt,
    )
)
