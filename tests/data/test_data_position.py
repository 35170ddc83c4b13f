"""What a checkpoint's data position is tied to: the training documents, not the code or the
cache key that made them."""

from __future__ import annotations

from test_data import conversation, data_config, write_jsonl  # noqa: F401 (data_config: a fixture)

from sft_jax.core.spec import RunSpec
from sft_jax.data import load_datasets
from sft_jax.data import tokenize as tok


def test_the_data_position_follows_the_documents_not_the_code(data_config, tmp_path, monkeypatch):  # noqa: F811
    write_jsonl(tmp_path / "train.jsonl", [conversation(i) for i in range(20)])
    first = load_datasets(RunSpec.of(data_config))
    # The span code changed (a reformat, say) without changing a document: the tokenization
    # cache is rebuilt under a new key, the data position still means the same rows.
    monkeypatch.setattr(tok, "code_fingerprint", lambda: "other code")
    again = load_datasets(RunSpec.of(data_config))
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 2
    assert again.fingerprint == first.fingerprint
    # Other documents (here: every token trains) are another data position.
    data_config.data.train_on = "all_tokens"
    assert load_datasets(RunSpec.of(data_config)).fingerprint != first.fingerprint
    write_jsonl(tmp_path / "train.jsonl", [conversation(i) for i in range(21)])
    data_config.data.train_on = "all_assistant"
    assert load_datasets(RunSpec.of(data_config)).fingerprint != first.fingerprint


def test_a_position_saved_by_an_older_version_is_refused_saying_why():
    import numpy as np
    import pytest

    from sft_jax.data import DataError, batches

    docs = tok.from_documents([(np.arange(5), np.ones(5, bool))] * 4, tok.empty_stats())
    rows = batches.TrainBatches(
        docs,
        global_rows=2,
        row_len=8,
        packing=True,
        seed=0,
        fingerprint=batches.DOCUMENTS_FINGERPRINT + "ab",
    )
    with pytest.raises(DataError, match="older sft_jax's fingerprint"):
        rows.set_state({"epoch": 0, "row": 2, "data_fingerprint": "0123abcd"})
    with pytest.raises(DataError, match="trained on other data"):
        rows.set_state({"epoch": 0, "row": 2, "data_fingerprint": "documents:cd"})
    rows.set_state({"epoch": 0, "row": 2, "data_fingerprint": "documents:ab"})
    assert rows.get_state()["row"] == 2
