"""Data pipeline: template masks per style, formats, shift, packing, resume, hosts, bad input."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import ml_collections
import numpy as np
import pytest
from chat_tokenizers import make_tokenizer

from sft_jax.core.spec import RunSpec
from sft_jax.data import DataError, TemplateError, load_datasets
from sft_jax.data import batches as batching
from sft_jax.data import tokenize as tok
from sft_jax.data.formats import Completion, Conversation, normalize
from sft_jax.data.records import Record

REPO = Path(__file__).resolve().parents[2]
SYSTEM = {"role": "system", "content": "Be brief ."}
TURNS = (
    {"role": "user", "content": "Hi !"},
    {"role": "assistant", "content": "Hello !"},
    {"role": "user", "content": "How are you ?"},
    {"role": "assistant", "content": "Fine thanks ."},
)


def marked(tokenizer, tokens: np.ndarray, trained: np.ndarray) -> str:
    """Tokens joined back into text, each run of trained tokens inside [[ ]]."""
    out, previous = "", False
    for piece, flag in zip(tokenizer.convert_ids_to_tokens(tokens.tolist()), trained, strict=True):
        out += ("[[" if flag and not previous else "]]" if previous and not flag else "") + piece
        previous = bool(flag)
    return out + ("]]" if previous else "")


def options(train_on: str = "all_assistant", max_length: int = 1000, **kw) -> tok.Options:
    return tok.Options(kw.pop("data_format", "messages"), train_on, max_length, False, **kw)


# Exact renderings with trained spans, multi-turn with a system prompt.
EXPECTED = {
    "chatml": "<|im_start|>system\nBe brief .<|im_end|>\n<|im_start|>user\nHi !<|im_end|>\n"
    "<|im_start|>assistant\n[[Hello !<|im_end|>]]\n<|im_start|>user\nHow are you ?<|im_end|>\n"
    "<|im_start|>assistant\n[[Fine thanks .<|im_end|>]]\n",
    "llama3": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief .<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nHi !<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n[[Hello !<|eot_id|>]]"
    "<|start_header_id|>user<|end_header_id|>\n\nHow are you ?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n[[Fine thanks .<|eot_id|>]]",
    "mistral": "<s>[INST] Be brief .\n\nHi ! [/INST][[ Hello !</s>]]"
    "[INST] How are you ? [/INST][[ Fine thanks .</s>]]",
    "gemma": "<bos><start_of_turn>user\nBe brief .\n\nHi !<end_of_turn>\n<start_of_turn>model\n"
    "[[Hello !<end_of_turn>]]\n<start_of_turn>user\nHow are you ?<end_of_turn>\n"
    "<start_of_turn>model\n[[Fine thanks .<end_of_turn>]]\n",
}
END_OF_TURN = {
    "chatml": "<|im_end|>",
    "llama3": "<|eot_id|>",
    "mistral": "</s>",
    "gemma": "<end_of_turn>",
}
GENERATION_PROMPT = {
    "chatml": "<|im_start|>assistant\n",
    "llama3": "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "mistral": "",  # this style has no generation prompt: [/INST] ends the user turn
    "gemma": "<start_of_turn>model\n",
}


@pytest.mark.parametrize("style", sorted(EXPECTED))
def test_assistant_spans_per_template_style(style):
    tokenizer = make_tokenizer(style)
    tokens, trained, notes = tok.tokenize_example(
        tokenizer, Conversation((SYSTEM, *TURNS)), options()
    )
    assert marked(tokenizer, tokens, trained) == EXPECTED[style]
    assert notes == {"truncated": 0, "duplicate_bos_removed": 0, "template_dropped_content": 0}
    # Exactly one BOS, although this tokenizer also adds one to plain text.
    if tokenizer.bos_token_id is not None:
        assert tokens[0] == tokenizer.bos_token_id
        assert np.sum(tokens == tokenizer.bos_token_id) == 1
    # Every end-of-turn token that closes a reply is trained; header tokens never are.
    end_id = tokenizer.convert_tokens_to_ids(END_OF_TURN[style])
    closes_reply = [i for i in np.flatnonzero(tokens == end_id) if trained[i - 1]]
    assert len(closes_reply) == 2 and all(trained[i] for i in closes_reply)
    header = tokenizer(GENERATION_PROMPT[style], add_special_tokens=False)["input_ids"]
    for start in range(len(tokens) - len(header) + 1):
        if header and tokens[start : start + len(header)].tolist() == header:
            assert not trained[start : start + len(header)].any()


@pytest.mark.parametrize("style", ["chatml", "llama3"])
def test_last_assistant_and_all_tokens(style):
    tokenizer = make_tokenizer(style)
    conversation = Conversation((SYSTEM, *TURNS))
    tokens, trained, _ = tok.tokenize_example(tokenizer, conversation, options("last_assistant"))
    text = marked(tokenizer, tokens, trained)
    assert text.count("[[") == 1 and f"[[Fine thanks .{END_OF_TURN[style]}]]" in text
    tokens, trained, _ = tok.tokenize_example(tokenizer, conversation, options("all_tokens"))
    assert trained.all()


def test_prompt_completion_messages_train_only_the_completion():
    tokenizer = make_tokenizer("chatml")
    value = {"prompt": list(TURNS[:3]), "completion": [TURNS[3]]}
    tokens, trained, _ = tok.tokenize_example(
        tokenizer, normalize(value, "prompt_completion"), options()
    )
    assert marked(tokenizer, tokens, trained).count("[[") == 1
    assert "[[Fine thanks .<|im_end|>]]" in marked(tokenizer, tokens, trained)


@pytest.mark.parametrize("style", ["llama3", "chatml"])
def test_plain_text_gets_one_bos_and_a_trained_eos(style):
    tokenizer = make_tokenizer(style)
    tokens, trained, _ = tok.tokenize_example(
        tokenizer, Completion("What is 2 + 3 ?", " 5"), options(data_format="prompt_completion")
    )
    bos = "<|begin_of_text|>" if style == "llama3" else ""
    eos = tokenizer.eos_token
    assert marked(tokenizer, tokens, trained) == f"{bos}What is 2 + 3 ?[[ 5{eos}]]"


def test_truncation_drops_examples_left_without_targets_and_counts():
    tokenizer = make_tokenizer("chatml")
    short = [TURNS[0], {"role": "assistant", "content": "Yes"}]
    long = [{"role": "user", "content": "How are you ? " * 5}, TURNS[3]]
    records = [Record("a.jsonl:1", {"messages": short}), Record("a.jsonl:2", {"messages": long})]
    short_tokens, _, _ = tok.tokenize_example(tokenizer, Conversation(tuple(short)), options())
    _, long_trained, _ = tok.tokenize_example(tokenizer, Conversation(tuple(long)), options())
    first_reply = int(np.argmax(long_trained))
    assert first_reply > len(short_tokens)

    kept = tok.tokenize_records(tokenizer, records, options(max_length=first_reply + 2))
    assert len(kept) == 2 and kept.stats["truncated"] == 1 and kept.stats["dropped"] == {}
    assert kept.lengths().tolist() == [len(short_tokens), first_reply + 2]

    cut = tok.tokenize_records(tokenizer, records, options(max_length=len(short_tokens)))
    assert len(cut) == 1 and cut.stats["dropped"] == {"no_target_tokens_after_truncation": 1}
    assert cut.stats["examples_read"] == 2 and cut.stats["truncated"] == 0


def random_documents(count: int, seed: int = 0, max_len: int = 40) -> tok.Tokenized:
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(count):
        length = int(rng.integers(2, max_len))
        docs.append((rng.integers(3, 100, length).astype(np.int32), rng.random(length) < 0.5))
    return tok.from_documents(docs, tok.empty_stats())


def test_rows_shift_targets_once_within_each_document():
    docs = tok.from_documents(
        [
            (np.array([1, 10, 11, 12, 13, 2]), np.array([0, 0, 0, 1, 1, 1], bool)),
            (np.array([1, 20, 21, 2]), np.array([0, 0, 1, 1], bool)),
        ],
        tok.empty_stats(),
    )
    row = {k: v[0].tolist() for k, v in batching.make_rows(docs, [[0, 1]], 12).items()}
    assert row["input_ids"] == [1, 10, 11, 12, 13, 2, 1, 20, 21, 2, 0, 0]
    assert row["target_ids"] == [10, 11, 12, 13, 2, 0, 20, 21, 2, 0, 0, 0]
    assert row["target_mask"] == [0, 0, 1, 1, 1, 0, 0, 1, 1, 0, 0, 0]
    assert row["positions"] == [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 0, 0]
    assert row["segment_ids"] == [1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 0, 0]


def trained_pairs(batch_list: list[dict]) -> list[tuple]:
    """(document tokens, trained target tokens) of every document in the batches."""
    out = []
    for batch in batch_list:
        for r in range(batch["input_ids"].shape[0]):
            for segment in set(batch["segment_ids"][r].tolist()) - {0}:
                where = batch["segment_ids"][r] == segment
                targets = batch["target_ids"][r][where][batch["target_mask"][r][where]]
                out.append((tuple(batch["input_ids"][r][where]), tuple(targets)))
    return sorted(out)


def test_packed_and_unpacked_carry_the_same_trainable_tokens():
    docs = random_documents(101)
    common = {"global_rows": 4, "row_len": 64}
    packed = batching.eval_batches(docs, packing=True, **common)
    padded = batching.eval_batches(docs, packing=False, **common)
    assert trained_pairs(packed) == trained_pairs(padded)
    assert len(trained_pairs(packed)) == 101
    total = sum(int(b["target_mask"].sum()) for b in packed)
    assert total == tok.trainable_tokens(docs)
    filled = sum(int((b["segment_ids"] > 0).sum()) for b in packed)
    assert len(packed) < len(padded) and filled / (len(packed) * 4 * 64) > 0.8


def test_best_fit_never_overflows_and_uses_every_document_once():
    lengths = np.random.default_rng(3).integers(1, 50, 500)
    rows = batching.best_fit(lengths, np.arange(500), 64)
    assert sorted(d for row in rows for d in row) == list(range(500))
    assert max(sum(lengths[row]) for row in rows) <= 64
    assert len(rows) <= int(np.ceil(lengths.sum() / 64)) + 3


def test_rows_hold_at_most_max_documents_per_row():
    """The bound the cuDNN kernel's segment table relies on, for train epochs and eval."""
    docs = random_documents(300, max_len=6)  # short: ~20 would fit in a row of 64
    for epoch in (0, 1):
        rows = batching.epoch_rows(docs, 64, True, seed=1, epoch=epoch, shuffle=True, max_docs=5)
        assert max(len(row) for row in rows) == 5
        assert sorted(d for row in rows for d in row) == list(range(300))
    unbounded = batching.epoch_rows(docs, 64, True, seed=1, epoch=0, shuffle=True)
    assert max(len(row) for row in unbounded) > 5
    # Unbounded by the config, later epochs are bounded by the first (which stays as it was).
    train = batching.TrainBatches(docs, global_rows=4, row_len=64, packing=True, seed=1)
    assert train.documents_per_row() == max(len(row) for row in unbounded)
    assert train._rows(0) == unbounded
    for epoch in (1, 2):
        assert max(len(row) for row in train._rows(epoch)) <= train.documents_per_row()
    eval_batches = batching.eval_batches(docs, global_rows=4, row_len=64, packing=True, max_docs=5)
    segments = [np.unique(b["segment_ids"][r]) for b in eval_batches for r in range(4)]
    assert max(len(set(s) - {0}) for s in segments) == 5


def test_epochs_are_reshuffled_and_deterministic():
    docs = random_documents(30)
    first = batching.epoch_rows(docs, 64, True, seed=1, epoch=0, shuffle=True)
    assert first == batching.epoch_rows(docs, 64, True, seed=1, epoch=0, shuffle=True)
    assert first != batching.epoch_rows(docs, 64, True, seed=1, epoch=1, shuffle=True)
    assert first != batching.epoch_rows(docs, 64, True, seed=2, epoch=0, shuffle=True)


@pytest.mark.parametrize("packing", [True, False])
def test_resume_yields_the_same_next_batches(packing):
    docs = random_documents(37)
    make = lambda: batching.TrainBatches(  # noqa: E731
        docs, global_rows=4, row_len=64, packing=packing, seed=5, fingerprint="abc"
    )
    uninterrupted = make()
    seen = [next(uninterrupted) for _ in range(30)]  # several epochs
    for k in (0, 3, 11):
        run = make()
        for _ in range(k):
            next(run)
        state = json.loads(json.dumps(run.get_state()))
        resumed = make()
        resumed.set_state(state)
        for expected in seen[k : k + 8]:
            got = next(resumed)
            for key in batching.BATCH_KEYS:
                np.testing.assert_array_equal(got[key], expected[key])
    other = batching.TrainBatches(docs, global_rows=4, row_len=64, packing=packing, seed=5)
    with pytest.raises(ValueError, match="other data"):
        other.set_state(state)


def test_each_process_reads_its_share_of_the_global_batch():
    docs = random_documents(50)
    common = {"global_rows": 8, "row_len": 64, "packing": True, "seed": 0}
    whole = batching.TrainBatches(docs, **common)
    shares = [
        batching.TrainBatches(docs, process_index=p, process_count=4, **common) for p in range(4)
    ]
    for _ in range(12):
        expected = next(whole)
        parts = [next(share) for share in shares]
        for key in batching.BATCH_KEYS:
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), expected[key])
    evals = [
        batching.eval_batches(
            docs, global_rows=8, row_len=64, packing=True, process_index=p, process_count=2
        )
        for p in range(2)
    ]
    whole_eval = batching.eval_batches(docs, global_rows=8, row_len=64, packing=True)
    for a, b, expected in zip(*evals, whole_eval, strict=True):
        np.testing.assert_array_equal(np.concatenate([a["input_ids"], b["input_ids"]]),
                                      expected["input_ids"])  # fmt: skip


def base_config() -> ml_collections.ConfigDict:
    spec = importlib.util.spec_from_file_location("base_config", REPO / "configs" / "base.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


@pytest.fixture
def data_config(tmp_path):
    """A config reading tmp_path/train.jsonl with a saved ChatML tokenizer, cache in tmp_path."""
    tokenizer_dir = tmp_path / "tokenizer"
    make_tokenizer("chatml").save_pretrained(tokenizer_dir)
    config = base_config()
    config.data.tokenizer = str(tokenizer_dir)
    config.data.train_files = str(tmp_path / "train.jsonl")
    config.data.eval_files = ""
    config.data.cache_dir = str(tmp_path / "cache")
    config.data.num_workers = 1
    config.data.max_length = 64
    return config


def write_jsonl(path: Path, rows: list) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def conversation(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"Add {i} and {i}"},
                         {"role": "assistant", "content": f"Answer {2 * i}"}]}  # fmt: skip


FORMAT_ROWS = {
    "messages": conversation(1),
    "sharegpt": {"conversations": [{"from": "system", "value": "Be brief ."},
                                   {"from": "human", "value": "Add 1 and 1"},
                                   {"from": "gpt", "value": "Answer 2"}]},
    "prompt_completion": {"prompt": "Add 1 and 1", "completion": " Answer 2"},
    "alpaca": {"instruction": "Add", "input": "1 and 1", "output": "Answer 2"},
    "text": {"text": "Add 1 and 1 Answer 2"},
}  # fmt: skip
FORMAT_TRAINED = {
    "messages": "Answer 2<|im_end|>",
    "sharegpt": "Answer 2<|im_end|>",
    "prompt_completion": " Answer 2<|im_end|>",
    "alpaca": "Answer 2<|im_end|>",
    "text": "Add 1 and 1 Answer 2<|im_end|>",
}


@pytest.mark.parametrize("data_format", sorted(FORMAT_ROWS))
@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet", ".csv"])
def test_formats_are_detected_from_columns_in_every_file_type(data_config, tmp_path, data_format,
                                                               suffix):  # fmt: skip
    rows = [FORMAT_ROWS[data_format]] * 3
    path = tmp_path / f"train{suffix}"
    if suffix == ".jsonl":
        write_jsonl(path, rows)
    elif suffix == ".json":
        path.write_text(json.dumps(rows))
    elif suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        import csv

        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            for row in rows:
                writer.writerow({k: json.dumps(v) if isinstance(v, list) else v
                                 for k, v in row.items()})  # fmt: skip
    data_config.data.train_files = str(path)
    loaded = load_datasets(RunSpec.of(data_config))
    tokenizer = loaded.tokenizer
    assert len(loaded.train) == 3
    tokens, trained = loaded.train.document(0)
    assert tokenizer.decode(tokens[trained].tolist()) == FORMAT_TRAINED[data_format]


def test_eval_fraction_holds_out_deterministically(data_config, tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [conversation(i) for i in range(40)])
    data_config.data.eval_fraction = 0.25
    first = load_datasets(RunSpec.of(data_config))
    again = load_datasets(RunSpec.of(data_config))
    assert len(first.eval) == 10 and len(first.train) == 30
    np.testing.assert_array_equal(first.eval.tokens, again.eval.tokens)
    held = {tuple(first.eval.document(i)[0]) for i in range(10)}
    assert not held & {tuple(first.train.document(i)[0]) for i in range(30)}


def test_tokenization_is_cached_and_the_key_follows_the_template(
    data_config, tmp_path, monkeypatch
):
    write_jsonl(tmp_path / "train.jsonl", [conversation(i) for i in range(20)])
    first = load_datasets(RunSpec.of(data_config))
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized again although cached")

    monkeypatch.setattr(tok, "tokenize_records", no_tokenizing)
    cached = load_datasets(RunSpec.of(data_config))
    np.testing.assert_array_equal(cached.train.tokens, first.train.tokens)
    np.testing.assert_array_equal(cached.train.trained, first.train.trained)
    assert cached.train.stats == first.train.stats and cached.fingerprint == first.fingerprint
    data_config.data.train_on = "last_assistant"  # other options: another key, tokenized anew
    with pytest.raises(AssertionError, match="tokenized again"):
        load_datasets(RunSpec.of(data_config))


def test_worker_processes_give_the_same_documents(data_config, tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [conversation(i) for i in range(600)])
    data_config.data.cache_dir = "none"
    single = load_datasets(RunSpec.of(data_config))
    data_config.data.num_workers = 2
    parallel = load_datasets(RunSpec.of(data_config))
    np.testing.assert_array_equal(parallel.train.tokens, single.train.tokens)
    np.testing.assert_array_equal(parallel.train.offsets, single.train.offsets)
    assert parallel.train.stats == single.train.stats


BAD_LINES = {
    "invalid_json": ('{"messages": [', r"train.jsonl:2: invalid JSON"),
    "missing_field": ({"prompt": "x"}, r"train.jsonl:2: missing field 'messages'"),
    "mistyped_field": (
        {"messages": [{"role": "user", "content": 5}]},
        r"train.jsonl:2: field 'messages\[0\].content' must be a string, got int",
    ),
    "unknown_role": (
        {"messages": [{"role": "bot", "content": "hi"}]},
        r"train.jsonl:2: messages\[0\] has unknown role 'bot'; expected one of system, user",
    ),
    "empty_conversation": ({"messages": []}, r"train.jsonl:2: field 'messages' is an empty"),
    "no_assistant": (
        {"messages": [{"role": "user", "content": "Hi"}]},
        r"train.jsonl:2: the conversation has no assistant message",
    ),
}


@pytest.mark.parametrize("reason", sorted(BAD_LINES))
def test_bad_input_names_file_and_line_or_is_a_counted_skip(data_config, tmp_path, reason):
    bad, message = BAD_LINES[reason]
    lines = [json.dumps(conversation(1)), bad if isinstance(bad, str) else json.dumps(bad),
             json.dumps(conversation(2))]  # fmt: skip
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=message) as error:
        load_datasets(RunSpec.of(data_config))
    assert "skip_bad_examples=True" in str(error.value)
    data_config.data.skip_bad_examples = True
    loaded = load_datasets(RunSpec.of(data_config))
    assert len(loaded.train) == 2
    assert loaded.train.stats["dropped"] == {reason: 1}
    assert loaded.train.stats["examples_read"] == 3


def test_tokenizer_without_chat_template_is_a_clear_error(data_config, tmp_path):
    make_tokenizer("chatml", template=False).save_pretrained(tmp_path / "plain")
    data_config.data.tokenizer = str(tmp_path / "plain")
    write_jsonl(tmp_path / "train.jsonl", [conversation(1)])
    with pytest.raises(TemplateError, match=r"train.jsonl:1: tokenizer .* has no chat template.*"
                                            r"config.data.chat_template"):  # fmt: skip
        load_datasets(RunSpec.of(data_config))
    data_config.data.chat_template = "chatml"  # the built-in default fixes it
    assert len(load_datasets(RunSpec.of(data_config)).train) == 1


def test_unknown_format_and_zero_trainable_tokens_are_errors(data_config, tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"question": "a", "answer": "b"}])
    with pytest.raises(DataError, match=r"train.jsonl:1: cannot tell the data format from the "
                                        r"fields \['answer', 'question'\]"):  # fmt: skip
        load_datasets(RunSpec.of(data_config))
    write_jsonl(tmp_path / "train.jsonl", [conversation(1)])
    data_config.data.max_length = 4
    with pytest.raises(DataError, match="no trainable tokens in 1 examples"):
        load_datasets(RunSpec.of(data_config))
    data_config.data.train_files = str(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match=r"missing.jsonl'?: no such file"):
        load_datasets(RunSpec.of(data_config))


def test_inspect_prints_spans_and_totals(data_config, tmp_path, capsys):
    from sft_jax.cli import inspect as inspect_cli

    write_jsonl(tmp_path / "train.jsonl", [conversation(i) for i in range(5)])
    totals = inspect_cli.report(RunSpec.of(data_config), num_examples=2, as_json=True)
    printed = json.loads(capsys.readouterr().out)
    assert printed == totals
    assert totals["train"]["examples_read"] == 5 and totals["train"]["examples_kept"] == 5
    assert 0 < totals["train"]["packing_efficiency"] <= 1
    inspect_cli.report(RunSpec.of(data_config), num_examples=2, as_json=False)
    text = capsys.readouterr().out
    assert "<|im_start|>assistant\n[[Answer 0<|im_end|>]]" in text
    assert "trainable tokens" in text


def test_last_reply_splits_prompt_and_reference():
    tokenizer = make_tokenizer("chatml")
    tokens, trained, _ = tok.tokenize_example(tokenizer, Conversation((SYSTEM, *TURNS)), options())
    docs = tok.from_documents([(tokens, trained)], tok.empty_stats())
    prompt, reply = docs.last_reply(0)
    assert tokenizer.decode(prompt.tolist()).endswith(
        "How are you ?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tokenizer.decode(reply.tolist()) == "Fine thanks .<|im_end|>"
    text = tok.from_documents([(tokens, np.ones_like(trained))], tok.empty_stats())
    assert text.last_reply(0) is None
