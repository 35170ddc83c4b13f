"""The objectives a run trains with, by `config.train.objective`: the one place that compares
their names. Everything else asks the registry what an objective reads, what it supports and
how it is built.

A new objective (online RL, say) is a module in objectives/ (a class with the five methods of
train/step.Objective) and one `register(ObjectiveKind(...))` call below.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from sft_jax.core.registry import Registry
from sft_jax.core.spec import SAVED_BEFORE_THE_FIELD
from sft_jax.models.decoder import CausalLM
from sft_jax.models.score_head import reward_pad_id
from sft_jax.objectives import grpo_config, ppo_run, preference, preference_config, reward

# What a run whose config predates config.train.objective trained with (core/spec.py's table).
DEFAULT = SAVED_BEFORE_THE_FIELD["train.objective"]

# build(config, model, max_segments, pad_token_id) -> the objective, or None for the step's own
# cross-entropy. On a mixture of experts the step adds the router's losses to either
# (objectives/moe.RouterLosses).
Build = Callable[[Any, CausalLM, int, "int | None"], Any]


@dataclasses.dataclass(frozen=True)
class ObjectiveKind:
    """What the rest of a run needs to know of an objective before it is built."""

    name: str
    build: Build
    # The rows it reads: "examples" (documents of SFT data, any loader), "pairs" (whole
    # chosen/rejected pairs, sft_jax.data.preference; the in-memory loader) or "prompts"
    # (online RL: prompts, sft_jax.data.prompts; the rows are sampled from the live policy).
    reads: str = "examples"
    # A score head of this many labels replaces the LM head (a reward model); None: a causal LM.
    score_labels: int | None = None
    # A value head beside the LM head (models/value_head.py: PPO's critic), trained with it.
    value_head: bool = False
    # Runs with the sequence split over mesh.context; with virtual tokens (prompt methods).
    context_axis: bool = False
    virtual_tokens: bool = False
    # Checks the config sections it owns (config_check calls it); raises ConfigError.
    check: Callable[[Any], None] = lambda config: None
    # Tokens of a train row (the planner's; the data source makes rows of this length).
    row_length: Callable[[Any], int] = lambda config: config.data.max_length


KINDS: Registry[ObjectiveKind] = Registry("objective")


def register(kind: ObjectiveKind) -> ObjectiveKind:
    return KINDS.register(kind.name, kind)


def names() -> tuple[str, ...]:
    return KINDS.names()


def name_of(config: Any) -> str:
    """config.train.objective (a run saved before the field existed: core.spec says DEFAULT)."""
    return config.train.objective


def kind_of(config: Any) -> ObjectiveKind:
    """The registered kind of config.train.objective; a ConfigError naming the choices."""
    return KINDS.get("train.objective", name_of(config))


def row_length(config: Any) -> int:
    """Tokens of a train row of config.train.objective (config.data.max_length, or online
    RL's prompt and completion)."""
    return kind_of(config).row_length(config)


def build(config: Any, model: CausalLM, max_segments: int, pad_token_id: int | None) -> Any:
    """The objective of the run, or None for the step's own cross-entropy."""
    return kind_of(config).build(config, model, max_segments, pad_token_id)


def _dpo(config, model, max_segments, pad_token_id):
    """DPO against the initial policy, or config.preference.reference_model: that model is
    model.reference (frozen variables of the steps, sharded like the policy), run every step
    ("copy") or once before training by the reference step ("precomputed")."""
    reference = preference_config.reference_of(config)
    chosen = preference_config.objective_from_config(
        config, max_segments or 3, config.preference.loss_type, reference
    )
    if config.preference.reference_model:
        loaded = preference_config.load_reference_model(config, model)
        preference.attach_reference(model, loaded)
    elif reference == "copy":
        preference.attach_frozen_copy(model)  # frozen variables of the steps, sharded
    return chosen


def _reference_free(loss_type: str) -> Build:
    """SimPO and ORPO: the objective's name is its loss type, and there is no reference."""
    return lambda config, model, max_segments, pad_token_id: (
        preference_config.objective_from_config(config, max_segments or 3, loss_type, "none")
    )


def _reward_objective(config, model, max_segments, pad_token_id):
    pad = reward_pad_id(pad_token_id, model.config.hf_config)
    return reward.objective_from_config(config, max_segments or 3, pad)


register(
    ObjectiveKind(
        "sft", build=lambda *args: None, reads="examples", context_axis=True, virtual_tokens=True
    )
)
register(ObjectiveKind("dpo", build=_dpo, reads="pairs", check=preference_config.check_dpo))
for _name in preference.REFERENCE_FREE:
    register(
        ObjectiveKind(
            _name,
            _reference_free(_name),
            reads="pairs",
            check=preference_config.check_reference_free,
        )
    )
register(
    ObjectiveKind(
        "reward", _reward_objective, reads="pairs", score_labels=1, check=reward.check_config
    )
)


def _rollout_row(config) -> int:
    """Online RL's rows: a prompt and its completion."""
    return config.grpo.max_prompt_length + config.grpo.max_completion_length


def _grpo(config, model, max_segments, pad_token_id):
    chosen = grpo_config.objective_from_config(config)
    if chosen.reference == "copy":
        preference.attach_frozen_copy(model)
    return chosen


register(
    ObjectiveKind(
        "grpo",
        _grpo,
        reads="prompts",
        check=grpo_config.check_config,
        row_length=_rollout_row,
    )
)


def _ppo(config, model, max_segments, pad_token_id):
    chosen = ppo_run.objective_from_config(config)
    if chosen.reference == "copy":
        with ppo_run.critic_set_aside(model):  # the reference is the policy alone
            preference.attach_frozen_copy(model)
    return chosen


register(
    ObjectiveKind(
        "ppo",
        _ppo,
        reads="prompts",
        value_head=True,
        check=ppo_run.check_config,
        row_length=_rollout_row,
    )
)
