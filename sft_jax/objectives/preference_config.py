"""config.preference for the objectives over preference pairs (objectives/preference.py):
the objective a config asks for, its reference, and the checks of the fields they read.

DPO's reference is the initial policy, or with config.preference.reference_model=PATH another
model of the same architecture (TRL's ref_model: the SFT model a DPO run starts from, or the
one an earlier DPO run started from when this one continues from its export). Then
preference.reference says how the step gets its log-probs: "copy" (and "auto") holds that model
as frozen weights beside the policy and runs it every step; "precomputed" runs it once over
every pair before training; "adapters_off" (the policy with its adapters off) is not that
model, and a ConfigError.
"""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx

from sft_jax.adapters.base_model import load_base_model
from sft_jax.core.errors import ConfigError, check_choice, need
from sft_jax.core.spec import RunSpec
from sft_jax.models import CausalLM
from sft_jax.models.config import ModelConfig
from sft_jax.models.moe import moe_blocks
from sft_jax.objectives.preference import (
    DPO_LOSSES,
    ORPO_NLL,
    REFERENCES,
    PairObjective,
    PreferenceSpec,
)

# ModelConfig fields that say how the model runs, not what it is (the reference takes the
# policy's).
_RUNTIME_FIELDS = ("attention", "max_segments")


def reference_of(config: RunSpec) -> str:
    """config.preference.reference, "auto" resolved: with a reference_model a frozen copy of
    it; else adapters off under LoRA, else a frozen copy of the initial weights."""
    reference = config.preference.reference
    if reference == "auto":
        if config.preference.reference_model or config.lora.rank == 0:
            return "copy"
        return "adapters_off"
    return reference


def load_reference_model(config: RunSpec, policy: CausalLM) -> CausalLM:
    """config.preference.reference_model loaded as the policy was (train/setup.build_model:
    safetensors only, the run's dtypes and quantization) on the policy's mesh, running with
    its attention kernel and expert dispatch; a ConfigError where its architecture is not the
    policy's."""
    reference = load_base_model(
        config,
        config.preference.reference_model,
        _mesh_of(policy),
        lambda loaded: check_same_architecture(config, policy.config, loaded),
        attention=policy.config.attention,
        max_segments=policy.config.max_segments,
    )
    for ours, theirs in zip(moe_blocks(policy), moe_blocks(reference), strict=True):
        theirs.dispatch, theirs.grouped_matmul = ours.dispatch, ours.grouped_matmul
    return reference


def _mesh_of(model: CausalLM) -> jax.sharding.Mesh:
    """The mesh the model's parameters are sharded on."""
    leaf = jax.tree.leaves(nnx.state(model, nnx.Param))[0]
    return leaf.sharding.mesh


def check_same_architecture(config: RunSpec, policy: ModelConfig, reference: ModelConfig) -> None:
    """A ConfigError naming preference.reference_model and every field of the architecture
    (vocabulary included) where the reference differs from the policy."""
    differences = [
        f"{field.name} {getattr(reference, field.name)!r} (the policy's: "
        f"{getattr(policy, field.name)!r})"
        for field in dataclasses.fields(ModelConfig)
        if field.compare
        and field.name not in _RUNTIME_FIELDS
        and getattr(reference, field.name) != getattr(policy, field.name)
    ]
    if differences:
        raise ConfigError(
            f"config.preference.reference_model={config.preference.reference_model!r}: not the "
            f"architecture of config.model.name_or_path={config.model.name_or_path!r}: "
            f"{'; '.join(differences)}. The reference must be the policy's architecture and "
            "vocabulary (e.g. the SFT model the policy was trained from)."
        )


def objective_from_config(
    config: RunSpec,
    max_segments: int,
    loss_type: str,
    reference: str,
) -> PairObjective:
    """The PairObjective of config.preference (checked by check_pairs / check_dpo) with
    `loss_type` (LOSS_TYPES) against `reference` (REFERENCES resolved, or "none");
    rows hold (max_segments - 1) // 2 pairs."""
    pref = config.preference
    spec = PreferenceSpec(
        loss_type=loss_type,
        beta=pref.beta,
        label_smoothing=pref.label_smoothing,
        simpo_gamma=pref.simpo_gamma,
        rpo_alpha=pref.rpo_alpha,
        orpo_nll=pref.orpo_nll,
    )
    return PairObjective(
        spec,
        reference=reference,
        max_pairs=max(1, (max_segments - 1) // 2),
        loss_chunk_size=config.train.loss_chunk_size,
    )


def check_pair_fields(config: RunSpec) -> None:
    """The fields every objective over preference pairs reads (DPO's family and reward models)."""
    pref = config.preference
    check_choice("preference.reference", pref.reference, REFERENCES)
    need(config, pref.beta > 0, "preference.beta", "must be positive.")
    need(
        config,
        0 <= pref.label_smoothing < 0.5,
        "preference.label_smoothing",
        "must be within [0, 0.5).",
    )
    need(config, pref.rpo_alpha >= 0, "preference.rpo_alpha", "must be 0 (off) or positive.")
    need(
        config,
        config.data.max_documents_per_row != 1,
        "data.max_documents_per_row",
        "a row holds whole preference pairs (2 documents each): use 0 or 2 or more.",
    )
    need(
        config,
        not config.data.eval_fraction,
        "data.eval_fraction",
        "preference pairs are evaluated from config.data.eval_files; set that.",
    )


def check_pairs(config: RunSpec) -> None:
    """config.preference for the reference-free objectives ("simpo", "orpo")."""
    check_choice("preference.loss_type", config.preference.loss_type, DPO_LOSSES)
    check_choice("preference.orpo_nll", config.preference.orpo_nll, ORPO_NLL)
    check_pair_fields(config)


def check_reference_free(config: RunSpec) -> None:
    """config.preference for "simpo" and "orpo": the pair fields, and no reference model."""
    check_pairs(config)
    check_no_reference_model(config)


def check_no_reference_model(config: RunSpec) -> None:
    """preference.reference_model is DPO's reference; another objective would ignore it."""
    need(
        config,
        not config.preference.reference_model,
        "preference.reference_model",
        "only train.objective='dpo' has a reference model (the others have none, or their own: "
        "grpo.beta's is the initial policy); leave it empty.",
    )


def has_reference_model(config: RunSpec) -> bool:
    """Whether DPO's reference is config.preference.reference_model (not the initial policy)."""
    return bool(config.preference.reference_model)


def _check_no_full_modules(config: RunSpec) -> None:
    """LoRA with a frozen reference model held beside the policy (model.reference): the
    modules LoRA trains in full are picked by name (adapters/lora.trainable_filter), which would
    pick the reference's modules of that name too."""
    why = (
        "with a frozen reference model beside the policy (preference.reference 'copy', or "
        "preference.reference_model), the reference's modules of that name would train too. "
    )
    need(
        config,
        not config.lora.trainable_modules,
        "lora.trainable_modules",
        why + "Leave it empty, or use preference.reference='precomputed' without a "
        "reference_model.",
    )
    need(config, not config.lora.train_router, "lora.train_router", why + "Leave it False.")


def check_dpo(config: RunSpec) -> None:
    """config.preference for "dpo": the pair fields, and a reference the run can have."""
    check_pairs(config)
    if has_reference_model(config):
        need(
            config,
            config.preference.reference != "adapters_off",
            "preference.reference",
            "with preference.reference_model set the reference is that model, not the policy "
            "with its adapters off: use 'copy' (or 'auto': that model's frozen weights beside "
            "the policy) or 'precomputed' (its log-probs computed once before training), or "
            "leave reference_model empty.",
        )
    if config.lora.rank > 0 and (reference_of(config) == "copy" or has_reference_model(config)):
        _check_no_full_modules(config)
    if reference_of(config) == "adapters_off":
        need(
            config,
            config.lora.rank > 0,
            "preference.reference",
            "'adapters_off' is the model with its LoRA adapters off, and this run has none "
            "(lora.rank=0): use 'copy' (a frozen copy of the initial weights) or "
            "'auto'.",
        )
        need(
            config,
            not config.lora.trainable_modules,
            "lora.trainable_modules",
            "with preference.reference='adapters_off' (what 'auto' is under LoRA) the DPO "
            "reference is the policy with its adapters off, and modules trained in full are no "
            "adapters: they would move the reference too. Leave it empty, or set "
            "preference.reference='precomputed' (the reference's log-probs computed once, "
            "before anything trains).",
        )
