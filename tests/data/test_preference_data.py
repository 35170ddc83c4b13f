"""Preference data: TRL's formats -> chosen/rejected documents -> rows of whole pairs; bad pairs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sft_jax.data import DataError, load_tokenizer
from sft_jax.data import preference as pref
from sft_jax.data import tokenize as tok
from sft_jax.data.formats import Completion, Conversation
from sft_jax.data.records import Record, read_records
from sft_jax.objectives.preference import pair_logps

DEMO = __import__("pathlib").Path(__file__).resolve().parents[2] / "assets" / "demo_model"
USER = [{"role": "user", "content": "2+2?"}]
SYSTEM = [{"role": "system", "content": "Be brief."}]


def reply(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(DEMO)


def options(max_length: int = 200, skip_bad: bool = False) -> tok.Options:
    return tok.Options("messages", "all_assistant", max_length, skip_bad)


def test_formats_give_the_same_pair():
    explicit = pref.normalize_pair({"prompt": USER, "chosen": reply("4"), "rejected": reply("5")})
    implicit = pref.normalize_pair({"chosen": USER + reply("4"), "rejected": USER + reply("5")})
    full_with_prompt = pref.normalize_pair(
        {"prompt": USER, "chosen": USER + reply("4"), "rejected": USER + reply("5")}
    )
    expected = (
        Conversation(tuple(USER + reply("4")), 1),
        Conversation(tuple(USER + reply("5")), 1),
    )
    assert explicit == implicit == full_with_prompt == expected
    # several shared turns (a system message, an earlier exchange) all go to the prompt
    history = SYSTEM + USER + reply("4") + [{"role": "user", "content": "and 3+3?"}]
    multi = pref.normalize_pair({"chosen": history + reply("6"), "rejected": history + reply("7")})
    assert multi[0].trained_from == multi[1].trained_from == len(history)
    assert pref.normalize_pair({"prompt": "2+2=", "chosen": "4", "rejected": "5"}) == (
        Completion("2+2=", "4"), Completion("2+2=", "5"))  # fmt: skip


def test_hh_style_strings_split_after_the_last_shared_assistant_marker():
    prompt = "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Sky color?\n\nAssistant:"
    chosen, rejected = pref.normalize_pair(
        {"chosen": prompt + " It is blue.", "rejected": prompt + " It is green."}
    )
    assert chosen == Completion(prompt, " It is blue.")
    assert rejected == Completion(prompt, " It is green.")
    # TRL's rule without the HH marker: the common prefix, less a trailing space
    assert pref.normalize_pair({"chosen": "Q: x A: yes", "rejected": "Q: x A: no"}) == (
        Completion("Q: x A:", " yes"), Completion("Q: x A:", " no"))  # fmt: skip


@pytest.mark.parametrize(
    "value, reason",
    [
        ({"prompt": USER, "chosen": reply("4"), "rejected": reply("4")}, "identical_pair"),
        ({"prompt": USER, "chosen": reply("4"), "rejected": reply("  ")}, "empty_completion"),
        ({"prompt": "2+2=", "chosen": "4", "rejected": ""}, "empty_completion"),
        ({"prompt": USER, "chosen": SYSTEM + reply("4"), "rejected": reply("5")},
         "prompt_not_prefix"),
        ({"chosen": reply("4"), "rejected": reply("5")}, "prompt_not_prefix"),
        ({"chosen": USER + reply("4"), "rejected": USER}, "empty_completion"),
        ({"prompt": USER, "chosen": 4, "rejected": "5"}, "mistyped_field"),
        ({"prompt": USER, "chosen": reply("4")}, "missing_field"),
        ({"prompt": USER, "chosen": reply("4"), "rejected": reply("5"), "margin": "high"},
         "bad_margin"),
        ({"prompt": USER, "chosen": reply("4"), "rejected": reply("5"), "margin": None},
         "bad_margin"),
    ],
)  # fmt: skip
def test_bad_pairs_stop_with_file_and_line_or_are_counted(tokenizer, tmp_path, value, reason):
    path = tmp_path / "pairs.jsonl"
    good = {"prompt": USER, "chosen": reply("4"), "rejected": reply("5")}
    path.write_text("".join(json.dumps(v) + "\n" for v in (good, value, good)))
    records = list(read_records(str(path), "train", None))
    with pytest.raises(DataError, match=f"{path}:2: "):
        pref.tokenize_pairs(tokenizer, iter(records), options())
    counted = pref.tokenize_pairs(tokenizer, iter(records), options(skip_bad=True))
    assert counted.stats["dropped"] == {reason: 1}
    assert len(counted) == 2 and counted.stats["examples_kept"] == 2


def test_chosen_and_rejected_train_the_reply_and_its_end_token_only(tokenizer):
    stream = [Record("f:1", {"prompt": SYSTEM + USER, "chosen": reply("4"),
                             "rejected": reply("five")})]  # fmt: skip
    docs = pref.tokenize_pairs(tokenizer, iter(stream), options()).documents
    for index, text in ((0, "4"), (1, "five")):
        tokens, trained = docs.document(index)
        assert tokenizer.decode(tokens[trained]) == text + "<|im_end|>"
        prompt = tokenizer.decode(tokens[: np.argmax(trained)])
        assert prompt.endswith("<|im_start|>assistant\n") and "Be brief." in prompt


def test_a_pair_longer_than_a_row_is_dropped_and_counted(tokenizer):
    stream = [
        Record("f:1", {"prompt": USER, "chosen": reply("4 " * 30), "rejected": reply("5")}),
        Record("f:2", {"prompt": USER, "chosen": reply("4"), "rejected": reply("5")}),
    ]
    docs = pref.tokenize_pairs(tokenizer, iter(stream), options(max_length=40))
    assert docs.stats["dropped"] == {"pair_too_long": 1} and len(docs) == 1


def random_pairs(count: int, seed: int = 0) -> tok.Tokenized:
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(2 * count):
        length = int(rng.integers(3, 12))
        docs.append((rng.integers(3, 100, length), np.arange(length) >= 2))
    return tok.from_documents(docs, tok.empty_stats())


@pytest.mark.parametrize("packing, max_pairs", [(False, 0), (True, 0), (True, 2)])
def test_rows_hold_whole_pairs_chosen_then_rejected(packing, max_pairs):
    documents = random_pairs(30)
    batches = pref.PairTrainBatches(
        pref.Pairs(documents),
        global_rows=4,
        row_len=48,
        packing=packing,
        seed=0,
        max_docs=max_pairs,
    )
    per_row = batches.documents_per_row()
    assert per_row == 1 if not packing else 1 < per_row <= (max_pairs or 99)
    seen = []
    for _ in range(batches.rows_per_epoch() // 4):
        batch = next(batches)
        sums = pair_logps(np.ones(batch["target_mask"].shape, np.float32), batch, per_row)
        valid = np.asarray(sums.valid)
        # each pair's two documents sit in one row as segments 2j - 1 and 2j
        for row in range(4):
            for j in np.flatnonzero(valid[row]):
                chosen = batch["input_ids"][row][batch["segment_ids"][row] == 2 * j + 1]
                rejected = batch["input_ids"][row][batch["segment_ids"][row] == 2 * j + 2]
                seen.append((tuple(chosen), tuple(rejected)))
    expected = {(tuple(documents.document(2 * k)[0]), tuple(documents.document(2 * k + 1)[0]))
                for k in range(30)}  # fmt: skip
    assert len(seen) == len(set(seen)) and set(seen) <= expected
    assert len(seen) >= 30 - 4 * per_row  # every pair but those of a last, partial batch


def test_margins_from_the_file_reach_the_reward_loss(tokenizer, tmp_path):
    """TRL's `margin` column (numbers, or numbers as text as CSV gives them) rides with its
    pair into packed rows in any order: the Bradley-Terry loss equals
    mean -log sigmoid(r_c - r_r - margin) with the file's margins."""
    import jax.numpy as jnp

    from sft_jax.models import from_pretrained
    from sft_jax.objectives.reward import RewardObjective, pair_rewards

    margins = [0.5, -1.0, "2.25", 0]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": [*USER, {"role": "user", "content": str(k)}],
                                        "chosen": reply(f"{k} yes"), "rejected": reply("no"),
                                        "margin": m}) + "\n"
                            for k, m in enumerate(margins)))  # fmt: skip
    pairs = pref.tokenize_pairs(tokenizer, iter(read_records(str(path), "train", None)), options())
    np.testing.assert_array_equal(pairs.margins, [0.5, -1.0, 2.25, 0.0])
    rows = [[2, 0], [1, 3]]
    batch = {k: jnp.asarray(v) for k, v in pairs.make_rows(rows, 128).items()}
    model = from_pretrained(DEMO, score_labels=1)
    objective = RewardObjective(tokenizer.pad_token_id, max_pairs=2)
    loss = objective.loss(objective.sums(model, batch), objective.normalizer(batch))
    hidden = model.hidden_states(batch["input_ids"], batch["positions"], batch["segment_ids"])
    without = {k: v for k, v in batch.items() if k != "pair_margins"}
    rewards = pair_rewards(model.scores(hidden)[..., 0], without, 2, tokenizer.pad_token_id)
    chosen, rejected = np.asarray(rewards.chosen), np.asarray(rewards.rejected)
    margin = np.asarray([[2.25, 0.5], [-1.0, 0.0]])
    expected = np.mean(np.logaddexp(0.0, -(chosen - rejected - margin)))
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    assert abs(expected - np.mean(np.logaddexp(0.0, -(chosen - rejected)))) > 0.1
