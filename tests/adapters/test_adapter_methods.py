"""The adapter protocol (adapters/methods.py): setup, checkpoint compatibility and export go
through the registered families; a new family is one registration away from a run."""

from __future__ import annotations

from flax import nnx
from test_data import base_config

from sft_jax.adapters import methods
from sft_jax.core.spec import RunSpec
from sft_jax.models import from_pretrained
from sft_jax.train import sharding
from sft_jax.train.setup import add_adapters
from sft_jax.workdir.compatibility import ADAPTER_FIELDS, config_changes


def test_the_registered_families_and_what_turns_each_on():
    assert [m.name for m in methods.methods()] == ["lora", "prompt"]
    assert methods.fields() == ADAPTER_FIELDS
    config = base_config()
    assert methods.enabled_methods(RunSpec.of(config)) == ()
    config.lora.rank = 8
    assert [m.name for m in methods.enabled_methods(RunSpec.of(config))] == ["lora"]
    config.lora.rank, config.prompt.method = 0, "prompt_tuning"
    assert [m.name for m in methods.enabled_methods(RunSpec.of(config))] == ["prompt"]


def test_a_registered_family_is_added_by_setup_and_shapes_resume(monkeypatch, hf_checkpoint):
    """A family that trains the embedding alone: setup adds it and trains what its filter
    names, and a checkpoint made with another value of its field does not resume."""
    added = []

    def add(model, config, mesh, tokenizer):
        added.append(config.train.steps)
        return nnx.PathContains("embed")

    toy = methods.AdapterMethod(
        "toy",
        fields=("train.seed",),
        enabled=lambda config: config.train.seed == 7,
        add=add,
        export=lambda model, config, out: (model, "toy"),
    )
    monkeypatch.setitem(methods.METHODS.entries, "toy", toy)
    config = base_config()
    config.train.seed = 7
    model = from_pretrained(hf_checkpoint("llama3.1")[0])
    spec, trainable = add_adapters(model, RunSpec.of(config), sharding.single_device_mesh())
    assert added == [config.train.steps] and not spec.enabled
    trained = nnx.to_flat_state(nnx.state(model, trainable))
    assert trained and all("embed" in "/".join(map(str, path)) for path, _ in trained)
    saved = base_config()
    saved.train.seed = 3
    assert config_changes(saved.to_json(), config, methods.fields()) == ["train.seed: 3 -> 7"]
