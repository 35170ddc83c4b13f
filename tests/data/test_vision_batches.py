"""Packing documents with images: each document whole in one row, a row within its tokens,
images and patches; a document over the budget named with the field to raise; a folder with
no processor named with both ways tried."""

from __future__ import annotations

import numpy as np
import pytest

from sft_jax.data import vision
from sft_jax.data.records import DataError
from sft_jax.data.vision_batches import check_budget, pack

BUDGET = (10, 2, 20)  # tokens, images, patches per row


def test_rows_hold_every_document_once_within_the_budget():
    rng = np.random.default_rng(0)
    cost = np.stack(
        [rng.integers(1, 8, 40), rng.integers(0, 3, 40), rng.integers(0, 12, 40)], axis=1
    )
    cost[:, 2] *= cost[:, 1] > 0  # patches only with images
    rows = pack(cost, rng.permutation(40), BUDGET, max_docs=3)
    assert sorted(d for row in rows for d in row) == list(range(40))
    for row in rows:
        assert np.all(cost[row].sum(axis=0) <= BUDGET) and len(row) <= 3
    # Images, not tokens, close rows here: two 1-token documents of 2 images each.
    assert pack(np.array([[1, 2, 4], [1, 2, 4]]), np.arange(2), BUDGET, 0) == [[0], [1]]
    assert pack(np.array([[1, 1, 4], [1, 1, 4]]), np.arange(2), BUDGET, 0) == [[0, 1]]


def test_a_document_over_the_budget_names_the_field():
    with pytest.raises(DataError, match=r"document 1 holds 3 images, over config.data.max_imag"):
        check_budget(np.array([[4, 1, 4], [4, 3, 8]]), BUDGET, "config.data.train_files")
    with pytest.raises(DataError, match=r"holds 21 image patches, over config.data.max_image_pa"):
        check_budget(np.array([[4, 1, 21]]), BUDGET, "config.data.eval_files")


def test_a_folder_with_no_processor_names_both_attempts(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(DataError, match=r"AutoProcessor: .*; from its parts: "):
        vision.load_processor(tmp_path)


def test_the_data_position_fingerprint_sees_image_counts():
    """Same tokens, other images (a patch more): another fingerprint, so a resume is refused."""
    from types import SimpleNamespace

    from sft_jax.data.vision_source import fingerprint

    tokenized = SimpleNamespace(tokens=np.arange(6), trained=np.ones(6, bool), offsets=[0, 6])

    def data(patches: int) -> SimpleNamespace:
        lengths = {"pixel_values": np.array([patches]), "image_grid_thw": np.array([1])}
        return SimpleNamespace(tokenized=tokenized, image_lengths=lambda: lengths)

    assert fingerprint(data(16)) == fingerprint(data(16)) != fingerprint(data(24))
