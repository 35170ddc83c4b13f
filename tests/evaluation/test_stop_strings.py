"""generate_until ends each row as soon as its text holds a stop string: fewer decode steps,
the same replies as generating to max_gen_toks and cutting after (what it did before, and what
lm-eval's hf backend gives: test_harness.py); the stepwise sampler's rows equal the one-loop
sampler's up to where the host ends each of them."""

from __future__ import annotations

import numpy as np
import pytest
from lm_eval.models.utils import postprocess_generated_text
from test_harness import instances
from tiny_tasks import save_model

from sft_jax.evaluation.harness import SftJaxLM
from sft_jax.generation.sampler import rollout
from sft_jax.generation.stepwise import CHECK_EVERY, rollout_until

CONTEXTS = ["What is 3 + 4 ? Answer :", "Hello ! How are you", "Sort these letters", "Fine"]
MAX_GEN_TOKS = 40


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    save_model(path)
    return SftJaxLM(str(path), batch_size=4, max_gen_toks=MAX_GEN_TOKS)


def _generate(lm: SftJaxLM, until: list[str]) -> tuple[list[str], int]:
    """The replies to CONTEXTS and the decode steps they took."""
    before = lm.decode_steps
    requests = [(context, {"until": until, "do_sample": False}) for context in CONTEXTS]
    replies = lm.generate_until(instances("generate_until", requests))
    return replies, lm.decode_steps - before


def test_rows_end_at_their_stop_string_with_the_same_replies(lm):
    full, full_steps = _generate(lm, [])  # no stop string: every row runs to max_gen_toks
    assert full_steps == MAX_GEN_TOKS  # the tiny model writes no EOS here
    # Stop strings: a piece of row 2's text (not at a token boundary), and a blank line.
    until = [full[2][4:7], "\n\n"]
    assert until[0].strip() and until[0] not in full[2][:4]
    meeting = [i for i, text in enumerate(full) if any(term in text for term in until)]
    assert 0 < len(meeting) < len(full)  # some rows meet one, some never do
    expected = [postprocess_generated_text(text, until, None) for text in full]
    replies, steps = _generate(lm, until)
    assert replies == expected
    assert [i for i in range(len(full)) if replies[i] != full[i]] == meeting
    assert steps == MAX_GEN_TOKS  # a row that never meets one runs to max_gen_toks
    # The rows that meet one (repeated to fill the batch): the batch ends within a check of
    # the last of them.
    rows = [meeting[i % len(meeting)] for i in range(len(full))]
    before = lm.decode_steps
    requests = [(CONTEXTS[i], {"until": until, "do_sample": False}) for i in rows]
    replies = lm.generate_until(instances("generate_until", requests))
    assert replies == [expected[i] for i in rows]
    steps = lm.decode_steps - before
    last_stop = max(len(lm.tok_encode(expected[i], add_special_tokens=False)) for i in meeting)
    assert steps < MAX_GEN_TOKS and steps <= last_stop + 2 * CHECK_EVERY
    print(f"decode steps: {steps} with stop strings, {full_steps} without")


def test_stepwise_rows_equal_rollout_up_to_where_each_ends(lm):
    """Sampled (the keys of each step are rollout's): row r ended once it holds ends[r]
    tokens, looked at every step; the batch stops with its last row."""
    prompts = [lm.tok_encode(context) for context in CONTEXTS[:3]]
    options = dict(
        max_new_tokens=20, stop_token_ids=[], temperature=0.8, top_k=5, seed=3,
        pad_id=lm.tokenizer.pad_token_id,
    )  # fmt: skip
    full = rollout(lm.model, prompts, **options)
    ends = [2, 7, 4]
    stepped = rollout_until(
        lm.model, prompts, lambda row, tokens: len(tokens) >= ends[row], check_every=1, **options
    )
    assert stepped.steps == max(ends)
    for row, end in enumerate(ends):
        assert stepped.rollout.tokens[row] == full.tokens[row][:end]
        np.testing.assert_allclose(stepped.rollout.logps[row], full.logps[row][:end], rtol=1e-6)
    assert stepped.rollout.stop_reasons == ["until"] * 3
    never = rollout_until(lm.model, prompts, lambda row, tokens: False, **options)
    assert never.rollout.tokens == full.tokens and never.steps == 20
    assert CHECK_EVERY > 1  # checking every step would cost a host round trip per token
