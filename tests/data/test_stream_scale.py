"""Memory that does not grow with the training data: store writing, the offsets index, the
contamination check."""

from __future__ import annotations

import re
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from chat_tokenizers import make_tokenizer
from test_data import base_config, conversation, write_jsonl

from sft_jax.core.spec import RunSpec
from sft_jax.data import contamination, records, store
from sft_jax.data import tokenize as tok
from sft_jax.data.mixture import prepared
from sft_jax.data.pipeline import run_tokenizer
from sft_jax.data.stream import Documents, StreamBatches


@pytest.fixture
def stream_config(tmp_path):
    """The stream loader on tmp_path/train.jsonl with a ChatML tokenizer, stores in tmp_path."""
    make_tokenizer("chatml").save_pretrained(tmp_path / "tokenizer")
    config = base_config()
    config.data.update(tokenizer=str(tmp_path / "tokenizer"), eval_files="", loader="stream",
                       train_files=str(tmp_path / "train.jsonl"), max_length=64,
                       cache_dir=str(tmp_path / "cache"), num_workers=1)  # fmt: skip
    return config


def test_store_writing_holds_the_chunks_in_flight_not_the_data(
    stream_config, tmp_path, monkeypatch
):
    """Records read but not yet appended to the store stay under two chunks, however many."""
    write_jsonl(tmp_path / "train.jsonl", [conversation(i) for i in range(200)])
    monkeypatch.setattr(tok, "_CHUNK", 8)
    counts = {"read": 0, "appended": 0, "most_ahead": 0}
    read_records, append = records.read_records, store.StoreWriter.append

    def counted_reads(*args, **kwargs):
        for record in read_records(*args, **kwargs):
            counts["read"] += 1
            counts["most_ahead"] = max(counts["most_ahead"], counts["read"] - counts["appended"])
            yield record

    def counted_append(writer, tokenized):
        counts["appended"] += tokenized.stats["examples_read"]
        append(writer, tokenized)

    monkeypatch.setattr(records, "read_records", counted_reads)
    monkeypatch.setattr(store.StoreWriter, "append", counted_append)
    spec = RunSpec.of(stream_config)
    written, _ = prepared(spec.data.train_files, "train", "f", run_tokenizer(spec), spec.data)
    assert counts["appended"] == written.stats["examples_read"] == 200 == len(written)
    assert counts["most_ahead"] <= 2 * 8, counts


def _resident_kib(path: Path) -> int:
    """Resident KiB of this process's mappings of `path` (/proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            inside = line.endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


def _store_of(root: Path, count: int) -> tok.Tokenized:
    """A store of `count` documents of 2-4 tokens (the second and later trained)."""
    lengths = np.random.default_rng(count).integers(2, 5, count)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    trained = np.ones(offsets[-1], bool)
    trained[offsets[:-1]] = False
    writer = store.StoreWriter(root, f"n{count}")
    writer.append(tok.Tokenized(np.arange(offsets[-1], dtype=np.int32) % 97, trained, offsets,
                                tok.empty_stats()))  # fmt: skip
    writer.close(dict(tok.empty_stats(), min_length=2))
    return store.open_store(root, f"n{count}")


@pytest.mark.skipif(
    not Path("/proc/self/smaps").exists(),
    reason="resident memory per mapping is read from Linux's /proc/self/smaps; other systems "
    "have no such file (CI and the TPU/GPU hosts run Linux, so it runs there)",
)
def test_offsets_index_held_is_one_window_whatever_the_document_count(tmp_path):
    """After the same 60 batches, the resident part of the offsets index is the same (a few
    pages at most) for 20,000 and 160,000 documents: not 8 bytes per document looked up."""
    held = {}
    for count in (20_000, 160_000):
        documents = Documents([_store_of(tmp_path, count)])
        source = StreamBatches(documents, [1.0], window=256, seed=0, shuffle=True, max_docs=0,
                               global_rows=8, row_len=64, packing=True)  # fmt: skip
        for _ in range(60):
            next(source)
        assert source.get_state()["epoch"] >= 30  # windows of documents all over the store
        assert len(source.window_documents(7)) == 256
        held[count] = _resident_kib(tmp_path / f"n{count}" / "offsets.bin")
    assert held[20_000] <= 16 and held[160_000] <= 16, held


@pytest.mark.parametrize("train_examples", [500, 5000])
def test_contamination_check_holds_the_eval_set_not_the_training_data(tmp_path, train_examples):
    """Python memory at the check's peak stays ~the same for 10x the training examples (the
    training texts were kept as digests, ~100 bytes each: ~1 MB at 5,000 examples), and the
    planted duplicates are found."""
    write_jsonl(tmp_path / "train.jsonl", [conversation(i) for i in range(train_examples)])
    write_jsonl(tmp_path / "eval.jsonl", [conversation(i) for i in (3, 7, -1, -2)])
    train = [(str(tmp_path / "train.jsonl"), "train", "messages", 0)]
    tracemalloc.start()
    found = contamination.report(str(tmp_path / "eval.jsonl"), "train", "messages", train, "f")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert found == {f"{tmp_path / 'eval.jsonl'}:1", f"{tmp_path / 'eval.jsonl'}:2"}
    assert peak < 200_000, peak
