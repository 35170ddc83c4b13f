"""The batch schema (core/batch.py): each field's kind decides its shape and sharding."""

from __future__ import annotations

import numpy as np
import pytest
from jax.sharding import PartitionSpec

from sft_jax.core import batch as schema
from sft_jax.core.batch import MARGIN_KEY, REFERENCE_KEY
from sft_jax.train import sharding


@pytest.fixture
def advantage(monkeypatch):
    """A per-row field registered for the test (what online RL adds: one value per sequence)."""
    name = "test_advantage"
    monkeypatch.setitem(schema.FIELDS, name, schema.Field(np.float32, schema.ROW, "advantage"))
    return name


def test_every_field_has_a_kind_and_the_base_keys_are_per_token():
    assert all(schema.FIELDS[k].kind == schema.TOKEN for k in schema.BASE_KEYS)
    assert schema.FIELDS[MARGIN_KEY].kind == schema.SEGMENT
    assert schema.FIELDS[REFERENCE_KEY].kind == schema.TOKEN
    with pytest.raises(ValueError, match="registered twice"):
        schema.register("input_ids", schema.FIELDS["input_ids"])
    with pytest.raises(ValueError, match="kind"):
        schema.register("test_bad", schema.Field(np.float32, "pixel", ""))


def test_only_per_token_arrays_split_their_time_axis_over_context(advantage):
    mesh = sharding.make_mesh(data=2, fsdp=1, tensor=1, context=4)
    shardings = sharding.batch_shardings(mesh, (*schema.BASE_KEYS, MARGIN_KEY, advantage))
    batch_axes = shardings["input_ids"].spec[0]
    assert shardings["input_ids"].spec == PartitionSpec(batch_axes, "context")
    assert shardings[MARGIN_KEY].spec == PartitionSpec(batch_axes, None)
    assert shardings[advantage].spec == PartitionSpec(batch_axes)
    abstract = sharding.abstract_batch(8, 16, mesh, (MARGIN_KEY, advantage))
    assert abstract[MARGIN_KEY].shape == (8, 16) and abstract[advantage].shape == (8,)


def test_a_per_row_field_is_placed_on_the_mesh_by_its_kind(advantage):
    mesh = sharding.make_mesh(data=4, fsdp=2, tensor=1)
    local = {advantage: np.arange(8, dtype=np.float32), "input_ids": np.ones((8, 4), np.int32)}
    placed = sharding.device_batch(local, sharding.batch_shardings(mesh, list(local)), 8)
    np.testing.assert_array_equal(np.asarray(placed[advantage]), local[advantage])
    assert placed[advantage].shape == (8,) and placed["input_ids"].shape == (8, 4)


def test_an_image_field_keeps_its_per_row_shape_and_splits_only_its_rows(monkeypatch):
    name = "test_pixels"
    monkeypatch.setitem(schema.FIELDS, name, schema.Field(np.float32, schema.IMAGE, "pixels"))
    mesh = sharding.make_mesh(data=2, fsdp=1, tensor=1, context=4)
    spec = sharding.batch_shardings(mesh, (name,))[name].spec
    assert spec == PartitionSpec(sharding.batch_shardings(mesh)["input_ids"].spec[0])
    abstract = sharding.abstract_batch(8, 16, mesh, (name,), per_row={name: (2, 3, 4, 4)})
    assert abstract[name].shape == (8, 2, 3, 4, 4)
    with pytest.raises(ValueError, match="per-row shape"):
        schema.shape(name, 8, 16)
    local = {name: np.arange(8 * 2 * 3 * 4 * 4, dtype=np.float32).reshape(8, 2, 3, 4, 4)}
    placed = sharding.device_batch(local, sharding.batch_shardings(mesh, [name]), 8)
    np.testing.assert_array_equal(np.asarray(placed[name]), local[name])


def test_pair_margins_are_one_value_per_chosen_segment():
    from test_preference_data import random_pairs

    from sft_jax.data.preference import Pairs

    pairs = Pairs(random_pairs(4), np.asarray([0.5, -1.0, 2.25, 3.0], np.float32))
    rows = [[2, 0], [1, 3]]  # pairs per row
    out = pairs.make_rows(rows, 128)
    expected = np.zeros((2, 128), np.float32)
    for r, row in enumerate(rows):
        for slot, pair in enumerate(row):
            expected[r, 2 * slot] = pairs.margins[pair]  # segment 2 * slot + 1: the chosen one
    np.testing.assert_array_equal(out[MARGIN_KEY], expected)
