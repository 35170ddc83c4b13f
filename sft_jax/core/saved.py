"""What a run saved before a field existed meant by its absence (core/spec.RunSpec.from_saved
reads it)."""

from __future__ import annotations

from typing import Any

# What a run saved before a field existed meant by its absence: history, not defaults (those
# are configs/base.py's). Read when a checkpoint's saved config is compared or exported.
SAVED_BEFORE_THE_FIELD: dict[str, Any] = {
    "train.objective": "sft",
    "eval.harness_tasks": "",
    "eval.harness_limit": 0,
    "eval.harness_include_path": "",
    "train.neftune_noise_alpha": 0.0,
    "preference.reference": "auto",
    "preference.reference_model": "",  # DPO's reference was the initial policy
    "preference.orpo_nll": "reply",  # ORPO's NLL before it followed TRL's (prompt and reply)
    "model.moe_dispatch": "auto",
    "mesh.context": 1,
    "mesh.auto": False,
    "data.max_documents_per_row": 0,
    "data.max_images_per_row": 8,  # runs before images trained on text alone
    "data.max_image_patches_per_row": 4096,
    "model.train_vision": False,
    "data.loader": "memory",
    "data.overlong": "truncate",
    "data.empty_replies": "warn",
    "data.contamination": "off",
    "data.mixture": [],
    "lora.method": "lora",
    "lora.use_dora": False,
    "lora.expert_adapters": False,
    "lora.train_router": False,
    "lora.vision_targets": "",
    # Runs before the trackers: TensorBoard alone, no curves.png.
    "log.trackers": "tensorboard",
    "log.run_name": "",
    "log.project": "sft_jax",
    "log.wandb_entity": "",
    "log.mlflow_tracking_uri": "",
    "log.curves": False,
    # Runs before online RL: none of them was one (every grpo field as configs/base.py has it).
    **{
        f"grpo.{name}": value
        for name, value in {
            "num_generations": 8,
            "max_prompt_length": 256,
            "max_completion_length": 256,
            "long_prompts": "skip",
            "temperature": 1.0,
            "top_p": 1.0,
            "top_k": 0,
            "min_p": 0.0,
            "loss_type": "dapo",
            "importance_sampling_level": "token",
            "scale_rewards": "group",
            "epsilon": 0.2,
            "epsilon_high": 0.0,
            "delta": 0.0,
            "beta": 0.0,
            "mask_truncated_completions": False,
            "reward_funcs": "math",
            "reward_weights": "",
            "num_iterations": 1,
            "max_sampling_logp_difference": 1.0,
            "importance_sampling_correction": False,
            "importance_sampling_mode": "sequence_mask",
            "importance_sampling_clip_min": 0.0,
            "importance_sampling_clip_max": 3.0,
            "eval_samples": 4,
        }.items()
    },
    # Runs before PPO: none of them was one (configs/base.py's values).
    **{
        f"ppo.{name}": value
        for name, value in {
            "gamma": 1.0,
            "lam": 0.95,
            "kl_coef": 0.05,
            "cliprange": 0.2,
            "cliprange_value": 0.2,
            "vf_coef": 0.1,
            "value_model": "",
        }.items()
    },
}
