"""The typed run spec (sft_jax/core/spec.py): every shipped config converts to it and back
unchanged, and a config that does not fit it is named field by field."""

from __future__ import annotations

import dataclasses
import importlib
import json
import pkgutil

import pytest

import configs
from configs import base
from sft_jax.core.errors import ConfigError
from sft_jax.core.spec import SAVED_BEFORE_THE_FIELD, RunSpec


@pytest.mark.parametrize("name", [m.name for m in pkgutil.iter_modules(configs.__path__)])
def test_every_shipped_config_is_a_run_spec_with_the_same_values(name):
    config = importlib.import_module(f"configs.{name}").get_config()
    spec = RunSpec.of(config)
    assert spec.to_dict() == config.to_dict()
    assert json.loads(spec.to_json()) == config.to_dict()
    assert RunSpec.of(spec) is spec
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.train.steps = 1  # type: ignore[misc]


def test_fields_are_typed_and_ints_widen_to_floats():
    config = base.get_config().to_dict()
    config["train"]["learning_rate"] = 1  # an int where a float is declared
    assert RunSpec.of(config).train.learning_rate == 1.0
    assert isinstance(RunSpec.of(config).train.learning_rate, float)
    config["train"]["steps"] = "ten"
    with pytest.raises(ConfigError, match=r"config\.train\.steps='ten': expected int, not str"):
        RunSpec.of(config)
    config["train"]["steps"] = True  # a bool is not a count
    with pytest.raises(ConfigError, match=r"config\.train\.steps=True"):
        RunSpec.of(config)


def test_missing_and_unknown_fields_are_named():
    config = base.get_config().to_dict()
    del config["data"]["packing"]
    with pytest.raises(ConfigError, match=r"config\.data has no packing: .*configs/base\.py"):
        RunSpec.of(config)
    config = base.get_config().to_dict()
    config["lora"]["adalora"]["tinitt"] = 3
    with pytest.raises(ConfigError, match=r"config\.lora\.adalora\.tinitt: no such field"):
        RunSpec.of(config)
    config = base.get_config().to_dict()
    del config["prompt"]
    with pytest.raises(ConfigError, match=r"config has no prompt"):
        RunSpec.of(config)


def test_with_values_changes_dotted_fields_and_checks_them():
    spec = RunSpec.of(base.get_config())
    changed = spec.with_values({"mesh.data": 2, "model.remat": "full"})
    assert (changed.mesh.data, changed.model.remat) == (2, "full")
    assert (spec.mesh.data, spec.model.remat) == (base.get_config().mesh.data, "none")
    with pytest.raises(ConfigError, match=r"config\.mesh\.data='2'"):
        spec.with_values({"mesh.data": "2"})


def test_a_saved_config_without_later_fields_takes_what_its_run_meant():
    config = base.get_config().to_dict()
    for dotted in SAVED_BEFORE_THE_FIELD:
        section, name = dotted.split(".")
        del config[section][name]
    spec = RunSpec.from_saved(json.dumps(config), "run/checkpoints/7")
    assert (spec.train.objective, spec.data.loader, spec.lora.method) == ("sft", "memory", "lora")
    assert spec.mesh.context == 1 and spec.data.mixture == ()
    del config["data"]["packing"]  # a field every run saved: not history, a broken save
    with pytest.raises(ConfigError, match=r"run/checkpoints/7: .*has no packing.*trained it"):
        RunSpec.from_saved(json.dumps(config), "run/checkpoints/7")
