"""config.preference for the objectives over preference pairs (objectives/preference.py):
the objective a config asks for, its reference, and the checks of the fields they read."""

from __future__ import annotations

from sft_jax.core.errors import check_choice, need
from sft_jax.core.spec import RunSpec
from sft_jax.objectives.preference import (
    DPO_LOSSES,
    ORPO_NLL,
    REFERENCES,
    PairObjective,
    PreferenceSpec,
)


def reference_of(config: RunSpec) -> str:
    """config.preference.reference, "auto" resolved: adapters off under LoRA, else a copy."""
    reference = config.preference.reference
    if reference == "auto":
        return "adapters_off" if config.lora.rank > 0 else "copy"
    return reference


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


def check_dpo(config: RunSpec) -> None:
    """config.preference for "dpo": the pair fields, and a reference the run can have."""
    check_pairs(config)
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
            "with DPO the reference is the model with its adapters off; modules trained in "
            "full would change it too. Leave it empty.",
        )
