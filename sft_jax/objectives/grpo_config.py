"""Online RL's config section (config.grpo): its checks, shared by every objective that samples
its rows (GRPO here, PPO in objectives/ppo_run.py), and GRPO's objective from it."""

from __future__ import annotations

from sft_jax.core.errors import check_choice, need
from sft_jax.core.spec import RunSpec
from sft_jax.objectives import grpo, grpo_sampling, rewards
from sft_jax.objectives.preference_config import check_no_reference_model

LONG_PROMPTS = ("skip", "error")


def reference_of(config: RunSpec, kl_weight: float | None = None) -> str:
    """Where the KL term's reference comes from: none without its weight (grpo.beta, or PPO's
    kl_coef), else the initial policy (adapters off under LoRA, else a frozen copy)."""
    if (config.grpo.beta if kl_weight is None else kl_weight) == 0.0:
        return "none"
    return "adapters_off" if config.lora.rank > 0 else "copy"


def objective_from_config(config: RunSpec) -> grpo.GRPOObjective:
    section = config.grpo
    spec = grpo.GRPOSpec(
        loss_type=section.loss_type,
        importance_sampling_level=section.importance_sampling_level,
        epsilon=section.epsilon,
        epsilon_high=section.epsilon_high or None,
        delta=section.delta,
        beta=section.beta,
        max_completion_length=section.max_completion_length,
        accumulation=config.train.gradient_accumulation_steps,
        importance_sampling_correction=section.importance_sampling_correction,
    )
    return grpo.GRPOObjective(
        spec,
        config.train.loss_chunk_size,
        section.temperature,
        reference_of(config),
        section.num_generations,
        section.scale_rewards,
    )


def _check_sampling(config: RunSpec) -> None:
    grpo = config.grpo
    need(config, grpo.temperature > 0, "grpo.temperature", "must be positive.")
    need(config, 0 < grpo.top_p <= 1, "grpo.top_p", "must be within (0, 1].")
    need(config, grpo.top_k >= 0, "grpo.top_k", "must be 0 (off) or positive.")
    need(config, 0 <= grpo.min_p < 1, "grpo.min_p", "must be within [0, 1) (0: off).")


def _check_correction(config: RunSpec) -> None:
    grpo = config.grpo
    check_choice(
        "grpo.importance_sampling_mode", grpo.importance_sampling_mode, grpo_sampling.MODES
    )
    need(
        config,
        grpo.importance_sampling_clip_min >= 0,
        "grpo.importance_sampling_clip_min",
        "0 (no lower bound) or a positive weight.",
    )
    need(
        config,
        grpo.importance_sampling_clip_max == 0
        or grpo.importance_sampling_clip_max > grpo.importance_sampling_clip_min,
        "grpo.importance_sampling_clip_max",
        "0 (no upper bound) or above importance_sampling_clip_min.",
    )


def check_config(config: RunSpec) -> None:
    """config.grpo for train.objective='grpo' (check_rollouts, and the loss's fields)."""
    section = config.grpo
    for field, choices in (
        ("loss_type", grpo.LOSS_TYPES),
        ("importance_sampling_level", grpo.IMPORTANCE_SAMPLING_LEVELS),
        ("scale_rewards", grpo.SCALE_REWARDS),
    ):
        check_choice(f"grpo.{field}", getattr(section, field), choices)
    need(
        config,
        section.num_generations >= 2,
        "grpo.num_generations",
        "a group of one completion has no std (scale_rewards) and is its own baseline (every "
        "advantage 0): sample at least 2 completions per prompt.",
    )
    need(config, 0 < section.epsilon < 1, "grpo.epsilon", "must be within (0, 1).")
    need(config, section.epsilon_high >= 0, "grpo.epsilon_high", "0 (= epsilon) or positive.")
    need(config, section.delta >= 0, "grpo.delta", "0 (off) or a cap above 1 + epsilon.")
    need(config, section.beta >= 0, "grpo.beta", "must be 0 (no KL term) or positive.")
    check_rollouts(config, reference_of(config), "grpo.beta > 0")


def check_rollouts(config: RunSpec, reference: str, kl_field: str) -> None:
    """What every online-RL objective asks of config.grpo (prompts, sampling, rewards, the
    gate) and of the other sections; the reward functions are imported here, so a path that
    does not import stops the run before anything is loaded. reference: reference_of's
    answer; kl_field: the setting that asks for it (named in the error)."""
    grpo = config.grpo
    check_choice("grpo.long_prompts", grpo.long_prompts, LONG_PROMPTS)
    need(config, grpo.num_generations >= 1, "grpo.num_generations", "must be at least 1.")
    need(
        config,
        config.train.global_batch_size % grpo.num_generations == 0,
        "train.global_batch_size",
        f"an update trains on whole groups: a multiple of grpo.num_generations "
        f"({grpo.num_generations}); global_batch_size / num_generations prompts per update.",
    )
    for field in ("max_prompt_length", "max_completion_length", "num_iterations"):
        need(config, getattr(grpo, field) >= 1, f"grpo.{field}", "must be at least 1.")
    _check_sampling(config)
    need(config, grpo.eval_samples >= 0, "grpo.eval_samples", "0 (greedy only) or more.")
    _check_correction(config)
    need(
        config,
        grpo.max_sampling_logp_difference >= 0,
        "grpo.max_sampling_logp_difference",
        "0 (no gate) or a positive log-prob difference.",
    )
    need(
        config,
        bool(config.data.train_files) and not config.data.mixture,
        "data.train_files",
        "online RL reads prompts from files (TRL's format: a `prompt` field, a string or a "
        "message list); a data.mixture is not supported here.",
    )
    if reference == "adapters_off":
        need(
            config,
            not config.lora.trainable_modules,
            "lora.trainable_modules",
            f"with {kl_field} the reference is the model with its adapters off; modules "
            "trained in full are no adapters and would move the reference too. Leave it "
            f"empty, or set {kl_field.removesuffix(' > 0')}=0 (no KL term, no reference).",
        )
    check_no_reference_model(config)
    rewards.rewards_from_config(
        grpo.reward_funcs, grpo.reward_weights, grpo.max_completion_length, models=False
    )
