"""Data at long lengths: an example over max_length is truncated or dropped as configured,
counted, never split; rows of 131072 tokens pack and shift like short ones."""

from __future__ import annotations

import numpy as np
import pytest
from chat_tokenizers import make_tokenizer
from test_data import TURNS, options

from configs import base
from sft_jax.core.errors import ConfigError
from sft_jax.core.spec import RunSpec
from sft_jax.data import batches as batching
from sft_jax.data import tokenize as tok
from sft_jax.data.records import Record
from sft_jax.train.config_check import check_values

LONG_ROW = 131072


def _records() -> list[Record]:
    long = [TURNS[0], {"role": "assistant", "content": "Fine thanks . " * 40}]
    return [
        Record("a.jsonl:1", {"messages": list(TURNS[:2])}),
        Record("a.jsonl:2", {"messages": long}),
        Record("a.jsonl:3", {"messages": long + list(TURNS[2:])}),
    ]


@pytest.mark.parametrize("overlong", ["truncate", "drop"])
def test_overlong_examples_are_truncated_or_dropped_and_counted(overlong):
    tokenizer = make_tokenizer("chatml")
    full = tok.tokenize_records(tokenizer, _records(), options(max_length=4096))
    lengths = full.lengths().tolist()
    limit = lengths[0] + 4  # the first example fits; the two long ones do not
    assert lengths[1] > limit and lengths[2] > limit
    kept = tok.tokenize_records(tokenizer, _records(), options(max_length=limit, overlong=overlong))
    if overlong == "truncate":
        # One document per example: the prefix of each, never the rest as another document.
        assert kept.lengths().tolist() == [lengths[0], limit, limit]
        np.testing.assert_array_equal(kept.document(1)[0], full.document(1)[0][:limit])
        assert kept.stats["truncated"] == 2 and kept.stats["dropped"] == {}
    else:
        assert kept.lengths().tolist() == [lengths[0]]
        assert kept.stats["dropped"] == {"too_long": 2} and kept.stats["truncated"] == 0
    assert kept.stats["examples_read"] == 3


def test_rows_of_131072_tokens_are_accepted_with_context_and_pack():
    config = base.get_config()
    config.data.max_length = LONG_ROW
    config.mesh.context = 8
    check_values(RunSpec.of(config), device_count=8, batch_shards=1)
    config.data.overlong = "split"
    with pytest.raises(ConfigError, match=r"data\.overlong.*truncate.*drop"):
        check_values(RunSpec.of(config), device_count=8, batch_shards=1)
    rng = np.random.default_rng(0)
    lengths = [LONG_ROW, 70000, 61072, 100000, 5]  # a full row, a pair that fills one, ...
    docs = tok.from_documents(
        [(rng.integers(3, 100, n).astype(np.int32), np.ones(n, bool)) for n in lengths],
        tok.empty_stats(),
    )
    rows = batching.best_fit(docs.lengths(), np.arange(len(docs)), LONG_ROW)
    assert sorted(sorted(row) for row in rows) == [[0], [1, 2], [3, 4]]
    batch = batching.make_rows(docs, rows, LONG_ROW)
    assert batch["input_ids"].shape == (3, LONG_ROW)
    row = next(i for i, r in enumerate(rows) if sorted(r) == [1, 2])
    first = rows[row][0]
    assert batch["positions"][row, lengths[first] - 1] == lengths[first] - 1
    assert batch["positions"][row, lengths[first]] == 0  # the second document restarts
    assert int(batch["target_mask"].sum()) == sum(n - 1 for n in lengths)


def test_best_fit_takes_the_fullest_row_then_the_lowest_index():
    # Rows after the first four documents: [9] room 1, [6] room 4, [6] room 4, [5] room 5.
    lengths = np.array([9, 6, 6, 5, 4, 4, 1, 3])
    rows = batching.best_fit(lengths, np.arange(8), row_len=10)
    # 4 -> row 1 (room 4, lower index than row 2), 4 -> row 2, 3 -> row 3 (room 5: the only
    # one with room >= 3 left), 1 -> row 0 (room 1).
    assert rows == [[0, 6], [1, 4], [2, 5], [3, 7]]
    assert batching.best_fit(np.array([130000, 131072, 1072]), np.arange(3), 131072) == [
        [1], [0, 2],
    ]  # fmt: skip
