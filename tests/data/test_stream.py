"""Data at scale: the tokenized store, the stream loader, mixtures, contamination check."""

from __future__ import annotations

import collections
import json

import numpy as np
import pytest
from chat_tokenizers import make_tokenizer
from test_data import base_config, conversation, random_documents, write_jsonl

from sft_jax.core.errors import ConfigError
from sft_jax.core.spec import RunSpec
from sft_jax.data import load_datasets
from sft_jax.data import tokenize as tok
from sft_jax.data.mixture import prepared
from sft_jax.data.pipeline import run_tokenizer
from sft_jax.data.stream import Documents, StreamBatches, index_shuffle
from sft_jax.train.config_check import check_values
from sft_jax.train.setup import open_run_data


@pytest.fixture
def stream_config(tmp_path):
    """The stream loader on tmp_path/train.jsonl with a ChatML tokenizer, stores in tmp_path."""
    make_tokenizer("chatml").save_pretrained(tmp_path / "tokenizer")
    config = base_config()
    config.data.update(tokenizer=str(tmp_path / "tokenizer"), eval_files="", loader="stream",
                       train_files=str(tmp_path / "train.jsonl"), max_length=64,
                       cache_dir=str(tmp_path / "cache"), num_workers=1)  # fmt: skip
    return config


@pytest.mark.parametrize("size", [1, 2, 7, 64, 1000, 4097])
def test_index_shuffle_is_a_seeded_permutation(size):
    order = index_shuffle(np.arange(size), size, (3, 0, 1))
    assert sorted(order.tolist()) == list(range(size))
    np.testing.assert_array_equal(order, index_shuffle(np.arange(size), size, (3, 0, 1)))
    if size > 64:
        assert not np.array_equal(order, index_shuffle(np.arange(size), size, (3, 0, 2)))
        assert np.mean(order == np.arange(size)) < 0.05


def test_store_is_written_once_memory_mapped_and_equals_tokenizing(
    stream_config, tmp_path, monkeypatch
):
    write_jsonl(tmp_path / "train.jsonl", [conversation(i) for i in range(30)])
    spec = RunSpec.of(stream_config)
    tokenizer, data = run_tokenizer(spec), spec.data
    first, key = prepared(data.train_files, "train", "train_files", tokenizer, data)
    assert not isinstance(first.tokens, np.ndarray) and (tmp_path / "cache/stores" / key).is_dir()
    reference = load_datasets(RunSpec.of(stream_config)).train
    np.testing.assert_array_equal(first.tokens, reference.tokens)
    np.testing.assert_array_equal(first.trained, reference.trained)
    np.testing.assert_array_equal(first.offsets, reference.offsets)

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized again although stored")

    monkeypatch.setattr(tok, "tokenized_chunks", no_tokenizing)
    again, same_key = prepared(data.train_files, "train", "train_files", tokenizer, data)
    assert same_key == key and again.stats["trainable_tokens"] == first.stats["trainable_tokens"]
    data = data.replace(train_on="last_assistant")  # another option: another key, tokenized anew
    with pytest.raises(AssertionError, match="tokenized again"):
        prepared(data.train_files, "train", "train_files", tokenizer, data)


def stream(sources, weights, process=(0, 1), rows=8, window=64, packing=True, seed=0):
    return StreamBatches(
        Documents(sources), weights, window=window, seed=seed, shuffle=True, max_docs=0,
        global_rows=rows, row_len=64, packing=packing, process_index=process[0],
        process_count=process[1], fingerprint="f",
    )  # fmt: skip


def test_resume_and_processes_give_the_global_batches_of_one_uninterrupted_process():
    sources = [random_documents(300, seed=1), random_documents(40, seed=2)]
    whole = stream(sources, [3, 1])
    reference = [next(whole) for _ in range(30)]
    halves = [stream(sources, [3, 1], process=(p, 2)) for p in range(2)]
    for step, expected in enumerate(reference):
        if step == 11:  # a restart of both processes from a saved state
            states = [json.loads(json.dumps(h.get_state())) for h in halves]
            halves = [stream(sources, [3, 1], process=(p, 2)) for p in range(2)]
            for half, state in zip(halves, states, strict=True):
                half.set_state(state)
        parts = [next(h) for h in halves]
        for key, value in expected.items():
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), value)
    read = [h.documents.read for h in halves]
    assert abs(read[0] - read[1]) < 0.2 * sum(read)  # each reads about its half, not all


def test_mixture_proportions_follow_the_weights_and_small_sources_repeat_by_epoch():
    sources = [random_documents(n, seed=n) for n in (5000, 800, 50)]
    loader = stream(sources, [0.5, 0.3, 0.2], window=1000)
    refs = np.concatenate([loader.window_documents(w) for w in range(10)])
    source = np.searchsorted(loader.documents.bases, refs, side="right") - 1
    share = np.bincount(source, minlength=3) / len(refs)
    assert len(refs) == 10_000 and np.all(np.abs(share - [0.5, 0.3, 0.2]) < 0.01), share
    small = refs[source == 2] - loader.documents.bases[2]  # 2000 draws: 40 epochs of 50
    assert np.all(np.bincount(small, minlength=50) == 40)  # each epoch: every document once
    epochs = [index_shuffle(np.arange(50), 50, (0, 2, e)) for e in range(40)]
    assert len({tuple(e) for e in epochs}) == 40  # reshuffled every epoch


def test_packed_windows_hold_each_document_once_and_fit_the_rows():
    sources = [random_documents(500, seed=5)]
    loader = stream(sources, [1], window=128)
    for window in range(3):
        rows = loader.epoch_rows(window)
        docs = [d for row in rows for d in row]
        assert sorted(docs) == sorted(loader.window_documents(window).tolist())
        assert all(sum(loader.documents.lengths(np.array(r))) <= 64 for r in rows)


def test_mixture_data_source_reports_each_source_and_finds_planted_duplicates(
    stream_config, tmp_path, caplog
):
    math = [conversation(i) for i in range(40)]
    chat = [{"messages": [{"role": "user", "content": f"Say hi {i}"},
                          {"role": "assistant", "content": f"Hi there {i}"}]}
            for i in range(30)]  # fmt: skip
    planted = [
        {"messages": [{"role": "user", "content": "Add   3 and 3"},  # whitespace differs
                      {"role": "assistant", "content": "Something else"}]},
        {"messages": [{"role": "user", "content": "A fresh question"},
                      {"role": "assistant", "content": "Hi there  7"}]},
    ]  # fmt: skip
    clean = [{"messages": [{"role": "user", "content": f"New {i}"},
                           {"role": "assistant", "content": f"Reply {i}"}]}
             for i in range(5)]  # fmt: skip
    write_jsonl(tmp_path / "math.jsonl", math)
    write_jsonl(tmp_path / "chat.jsonl", chat)
    write_jsonl(tmp_path / "math_eval.jsonl", clean[:3] + planted)
    write_jsonl(tmp_path / "chat_eval.jsonl", clean[3:])
    data = stream_config.data
    data.loader, data.contamination, data.stream_window = "stream", "drop", 32
    data.mixture = [
        {"name": "math", "train_files": str(tmp_path / "math.jsonl"), "weight": 2,
         "eval_files": str(tmp_path / "math_eval.jsonl")},
        {"name": "chat", "train_files": str(tmp_path / "chat.jsonl"), "weight": 1,
         "eval_files": str(tmp_path / "chat_eval.jsonl"), "max_examples": 10},
    ]  # fmt: skip
    stream_config.train.global_batch_size = 4
    check_values(RunSpec.of(stream_config), device_count=1, batch_shards=1)
    with caplog.at_level("INFO"):
        source = open_run_data(RunSpec.of(stream_config))
    warnings = [r.getMessage() for r in caplog.records if "also occur in training" in r.message]
    assert len(warnings) == 1 and "2 of 5 eval examples" in warnings[0], warnings
    assert (
        "math_eval.jsonl:4 (prompt)" in warnings[0] and "math_eval.jsonl:5 (reply)" in warnings[0]
    )
    assert sorted(source.eval_sets) == ["chat", "math"]
    math_eval_rows = sum(
        int(b["segment_ids"].max(initial=0) > 0) for b in source.eval_sets["math"]()
    )
    assert math_eval_rows >= 1
    eval_docs = sum(len(np.unique(b["segment_ids"][b["segment_ids"] > 0]))
                    for b in source.eval_sets["math"]())  # fmt: skip
    assert eval_docs <= 3  # the two planted examples were dropped
    batch = next(source.train_batches)
    assert batch["input_ids"].shape == (4, data.max_length)
    assert source.train_batches.get_state()["loader"] == "stream"


def test_contamination_report_finds_nothing_in_clean_eval(stream_config, tmp_path, caplog):
    write_jsonl(tmp_path / "train.jsonl", [conversation(i) for i in range(20)])
    write_jsonl(tmp_path / "eval.jsonl", [conversation(i) for i in range(100, 104)])
    data = stream_config.data
    data.loader, data.contamination, data.eval_files = (
        "stream",
        "report",
        str(tmp_path / "eval.jsonl"),
    )
    with caplog.at_level("INFO"):
        open_run_data(RunSpec.of(stream_config))
    assert any("none of 4 eval examples" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    "entry, problem",
    [
        ({"name": "a"}, "at least train_files"),
        ({"train_files": "x", "weight": 0}, "positive number"),
        ({"train_files": "x", "wieght": 1}, "unknown keys"),
        ({"train_files": "x", "format": "csv"}, "expected one of"),
    ],
)
def test_bad_mixture_entries_are_config_errors(stream_config, entry, problem):
    stream_config.data.loader = "stream"
    stream_config.data.mixture = [entry]
    with pytest.raises(ConfigError, match=problem):
        check_values(RunSpec.of(stream_config), device_count=1, batch_shards=1)


def test_mixture_needs_the_stream_loader(stream_config):
    stream_config.data.loader = "memory"
    stream_config.data.mixture = [{"train_files": "x"}]
    with pytest.raises(ConfigError, match="loader='stream'"):
        check_values(RunSpec.of(stream_config), device_count=1, batch_shards=1)


@pytest.mark.parametrize(
    ("field", "value", "problem"),
    [
        ("train.objective", "dpo", r"^config\.data\.loader='stream': train\.objective='dpo' "
         r"trains on preference pairs, which only loader='memory' reads"),
        ("data.eval_fraction", 0.1, r"^config\.data\.eval_fraction=0\.1: the stream loader "
         r"does not split .* give config\.data\.eval_files"),
    ],
    ids=["preference_objective", "eval_fraction"],
)  # fmt: skip
def test_what_the_stream_loader_does_not_do_is_named(stream_config, field, value, problem):
    section, name = field.split(".")
    stream_config[section][name] = value
    with pytest.raises(ConfigError, match=problem):
        check_values(RunSpec.of(stream_config), device_count=1, batch_shards=1)


def test_source_shares_are_counted_in_stream_order():
    loader = stream([random_documents(100, seed=1), random_documents(100, seed=2)], [1, 3])
    refs = loader.window_documents(0)
    counts = collections.Counter((refs >= 100).tolist())
    assert counts[True] == 48 and counts[False] == 16
