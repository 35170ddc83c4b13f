"""What a checkpoint must share with the run that resumes it (or takes its parameters): the
config fields that shape the saved state or give the data position its meaning, the model's
shape, and the arrays' shapes; each difference named, so a refused resume says why."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from sft_jax.adapters import methods as adapter_methods
from sft_jax.core.spec import SAVED_BEFORE_THE_FIELD, RunSpec

# What a resumed run must share with the run that saved: the saved state's structure (model,
# dtypes, adapters, quantization, clipping) and the meaning of the data position (data, row
# length, batch, seed). Steps, learning rate, eval and logging may change between restarts.
ADAPTER_FIELDS = adapter_methods.fields()  # adapters/methods.py: each family's
RESUME_FIELDS = (
    "model.name_or_path",
    "model.param_dtype",
    *ADAPTER_FIELDS,
    "data.train_files",
    "data.train_split",
    "data.format",
    "data.chat_template",
    "data.train_on",
    "data.max_length",
    "data.packing",
    "data.max_documents_per_row",
    "data.shuffle",
    "train.global_batch_size",
    "train.seed",
    # The objective decides what the parameters are (a reward model has a score head, no LM
    # head) and what the data rows hold; the reference is what DPO's rewards are measured from.
    "train.objective",
    "preference.reference",
    "preference.reference_model",
    # Online RL: which prompts each rollout takes, the rows' shape, the rollouts a resume reuses.
    "grpo.num_generations",
    "grpo.num_iterations",
    "grpo.max_prompt_length",
    "grpo.max_completion_length",
)


def config_changes(
    saved_json: str, config: RunSpec, fields: tuple[str, ...] = RESUME_FIELDS
) -> list[str]:
    """'field: saved -> now' for each of `fields` that differs (for RESUME_FIELDS, also
    clipping turned on or off, which changes the optimizer state)."""
    saved = json.loads(saved_json)

    def lookup(tree: Any, dotted: str) -> Any:
        for part in dotted.split("."):
            tree = tree.get(part) if isinstance(tree, Mapping) else None
        return SAVED_BEFORE_THE_FIELD.get(dotted) if tree is None else tree

    now = config.to_dict()
    changes = [
        f"{field}: {lookup(saved, field)!r} -> {lookup(now, field)!r}"
        for field in fields
        if lookup(saved, field) != lookup(now, field)
    ]
    clipped = [(lookup(tree, "train.max_grad_norm") or 0) > 0 for tree in (saved, now)]
    if fields is RESUME_FIELDS and clipped[0] != clipped[1]:  # clipping adds optimizer state
        changes.append(f"train.max_grad_norm > 0: {clipped[0]} -> {clipped[1]}")
    return changes


# The model fields a checkpoint records, to name what changed when a resume is refused.
MODEL_FIELDS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "tie_word_embeddings",
)


def model_summary(hf_config: dict[str, Any]) -> dict[str, Any]:
    """The fields of a model's Hugging Face config that shape its parameters."""
    return {field: hf_config.get(field) for field in MODEL_FIELDS}


def shape_changes(state_dir: Path, abstract_state: Any, most: int = 4) -> list[str]:
    """Parameters whose presence or shape differ between a saved train state and
    `abstract_state` (none where the saved metadata cannot be read: then the restore itself
    tells). Only "params" is compared: its layout is plain nested dicts on both sides."""
    try:
        saved = ocp.PyTreeCheckpointer().metadata(state_dir).item_metadata.tree["params"]
    except Exception:
        return []
    flat_saved = {_path(p): tuple(getattr(v, "shape", ())) for p, v in _leaves(saved)}
    flat_now = {_path(p): tuple(v.shape) for p, v in _leaves(abstract_state["params"])}
    changes = [
        f"params/{path}: {_shape(flat_saved.get(path))} saved, {_shape(flat_now.get(path))} now"
        for path in sorted(set(flat_saved) | set(flat_now))
        if flat_saved.get(path) != flat_now.get(path)
    ]
    if len(changes) > most:
        changes = [*changes[:most], f"{len(changes) - most} more arrays differ"]
    return changes


def _leaves(tree: Any) -> list[tuple[Any, Any]]:
    return jax.tree_util.tree_flatten_with_path(tree)[0]


def _path(path: tuple[Any, ...]) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _shape(shape: tuple[int, ...] | None) -> str:
    return "absent" if shape is None else str(list(shape))
