"""The objective registry (sft_jax/objectives/registry.py): the one place that compares
config.train.objective to names; a new objective is one registration away from a run."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
from test_data import base_config

from sft_jax.core.errors import ConfigError
from sft_jax.core.spec import RunSpec
from sft_jax.objectives import registry
from sft_jax.train.config_check import check_values
from sft_jax.train.setup import score_labels

PACKAGE = Path(__file__).resolve().parents[2] / "sft_jax"


def test_the_registered_objectives_and_what_each_reads():
    assert registry.names() == ("sft", "dpo", "simpo", "orpo", "reward", "grpo", "ppo")
    config = base_config()
    reads = {}
    for name in registry.names():
        config.train.objective = name
        reads[name] = registry.kind_of(RunSpec.of(config)).reads
    assert reads == {
        "sft": "examples",
        "dpo": "pairs",
        "simpo": "pairs",
        "orpo": "pairs",
        "reward": "pairs",
        "grpo": "prompts",
        "ppo": "prompts",
    }
    config.train.objective = "reward"
    assert score_labels(RunSpec.of(config)) == 1  # reward: a scalar score head
    config.train.objective = "sft"
    assert score_labels(RunSpec.of(config)) is None


def test_an_unknown_objective_names_the_field_and_the_choices():
    config = base_config()
    config.train.objective = "a2c"
    with pytest.raises(
        ConfigError,
        match=r"config.train.objective='a2c': expected one of "
        r"sft, dpo, simpo, orpo, reward, grpo, ppo\.",
    ):
        check_values(RunSpec.of(config), device_count=1, batch_shards=1)


def test_a_config_saved_before_the_objective_field_trains_sft():
    config = base_config().to_dict()
    del config["train"]["objective"]
    saved = RunSpec.from_saved(json.dumps(config), "a checkpoint")
    assert registry.kind_of(saved).name == registry.DEFAULT == "sft"


def test_a_registered_objective_is_checked_and_built_by_the_run(monkeypatch):
    """What a new objective (online RL, say) needs: a registration, nothing else edited."""
    checked = []
    kind = registry.ObjectiveKind(
        "toy",
        build=lambda config, model, segments, pad: ("toy objective", segments, pad),
        reads="examples",
        check=checked.append,
    )
    monkeypatch.setitem(registry.KINDS.entries, "toy", kind)
    config = base_config()
    config.train.objective = "toy"
    spec = RunSpec.of(config)
    check_values(spec, device_count=1, batch_shards=1)
    assert checked == [spec]
    assert registry.build(spec, None, 7, 0) == ("toy objective", 7, 0)
    with pytest.raises(ValueError, match="registered twice"):
        registry.register(kind)


def reads_the_objective(node: ast.AST) -> bool:
    """`x.train.objective` or `x.train.get("objective", ...)`."""
    if isinstance(node, ast.Attribute) and node.attr == "objective":
        return isinstance(node.value, ast.Attribute) and node.value.attr == "train"
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "get"
        and bool(node.args)
        and isinstance(node.args[0], ast.Constant)
        and node.args[0].value == "objective"
    )


def test_only_the_registry_reads_the_objective_name():
    """Everything else asks the registry what the objective reads, supports and builds."""
    readers = sorted(
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if any(reads_the_objective(node) for node in ast.walk(ast.parse(path.read_text())))
    )
    assert readers == ["objectives/registry.py"]
