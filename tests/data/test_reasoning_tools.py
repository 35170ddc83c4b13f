"""Reasoning and tool-call data: the data model, bad input, the mask certificate, the cache key."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from chat_tokenizers import make_tokenizer
from test_chat_templates import TEXT_AND_CALL, TOOL_CHAT, build, trained_runs
from test_data import base_config, write_jsonl

from sft_jax.core.spec import RunSpec
from sft_jax.data import DataError, certificate, load_datasets
from sft_jax.data import tokenize as tok
from sft_jax.data.formats import normalize
from sft_jax.data.messages import reasoning_and_answer
from sft_jax.data.pipeline import certify
from sft_jax.data.records import Record

REPO = __import__("pathlib").Path(__file__).resolve().parents[2]
CALL = {"type": "function", "id": "c1", "function": {"name": "add", "arguments": {"a": 1}}}


def test_messages_with_reasoning_tool_calls_and_tool_results_are_normalized():
    value = {
        "tools": json.dumps([{"name": "add", "parameters": {"type": "object"}}]),
        "chat_template_kwargs": {"enable_thinking": False},
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Add "}, {"type": "text",
                                                                             "text": "1"}]},
            {"role": "assistant", "thinking": "Use the tool .", "content": None,
             "tool_calls": [{**CALL, "function": {"name": "add", "arguments": '{"a": 1}'}}]},
            {"role": "ipython", "content": {"sum": 1}, "tool_call_id": "c1"},
            {"role": "assistant", "content": "<think>\nDone .\n</think>\n\n1"},
        ],
    }  # fmt: skip
    conversation = normalize(value, "messages")
    assert conversation.tools == ({"type": "function", "function": {
        "name": "add", "parameters": {"type": "object"}}},)  # fmt: skip
    assert conversation.template_kwargs == {"enable_thinking": False}
    assert conversation.messages == (
        {"role": "user", "content": "Add 1"},
        {
            "role": "assistant",
            "content": "",
            "reasoning_content": "Use the tool .",
            "tool_calls": [
                {"type": "function", "id": "c1", "function": {"name": "add", "arguments": {"a": 1}}}
            ],
        },
        {"role": "tool", "content": '{"sum": 1}', "tool_call_id": "c1"},
        {"role": "assistant", "content": "<think>\nDone .\n</think>\n\n1"},
    )
    assert reasoning_and_answer(conversation.messages[3]) == ("Done .", "1")  # fmt: skip


def test_sharegpt_function_call_and_observation_turns():
    value = {"conversations": [
        {"from": "human", "value": "Add 1"},
        {"from": "function_call", "value": '{"name": "add", "arguments": {"a": 1}}'},
        {"from": "observation", "value": "1"},
        {"from": "gpt", "value": "It is 1 ."}]}  # fmt: skip
    messages = normalize(value, "sharegpt").messages
    assert messages[1] == {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "add", "arguments": {"a": 1}}}]}  # fmt: skip
    assert messages[2] == {"role": "tool", "content": "1"}


@pytest.fixture
def data_config(tmp_path) -> ml_collections.ConfigDict:
    make_tokenizer("chatml").save_pretrained(tmp_path / "tokenizer")
    config = base_config()
    config.data.tokenizer = str(tmp_path / "tokenizer")
    config.data.train_files = str(tmp_path / "train.jsonl")
    config.data.eval_files = ""
    config.data.cache_dir = str(tmp_path / "cache")
    config.data.num_workers = 1
    return config


def chat(*turns: dict, **fields) -> dict:
    return {"messages": [{"role": "user", "content": "Hi"}, *turns], **fields}


ANSWER = {"role": "assistant", "content": "Hello"}
BAD_EXAMPLES = {
    "orphan_tool_result": (
        chat({"role": "tool", "content": "1"}, ANSWER),
        r"messages\[1\] is a tool result with no tool call before it",
    ),
    "invalid_tool_arguments": (
        chat(
            {
                "role": "assistant",
                "tool_calls": [{**CALL, "function": {"name": "add", "arguments": '{"a": '}}],
            }
        ),
        r"messages\[1\]\.tool_calls\[0\]\.function\.arguments is not valid JSON",
    ),
    "bad_tool_schema": (
        chat(ANSWER, tools=[{"description": "no name"}]),
        r"tools\[0\] is not a function schema",
    ),
    "misplaced_reasoning": (
        {"messages": [{"role": "user", "content": "Hi", "reasoning": "hm"}, ANSWER]},
        r"messages\[0\]\.reasoning: only assistant messages carry reasoning",
    ),
    # The test ChatML template renders content only: the call is missing from its render.
    "template_drops_tool_calls": (
        chat(
            {"role": "assistant", "content": "Hello", "tool_calls": [CALL]},
            {"role": "tool", "content": "1", "tool_call_id": "c1"},
            ANSWER,
        ),
        r"assistant message 1: .* leaves out its tool_calls\[0\]",
    ),
}


@pytest.mark.parametrize("reason", sorted(BAD_EXAMPLES))
def test_bad_tool_and_reasoning_input_names_file_line_and_field(data_config, tmp_path, reason):
    bad, message = BAD_EXAMPLES[reason]
    write_jsonl(tmp_path / "train.jsonl", [chat(ANSWER), bad, chat(ANSWER)])
    with pytest.raises(DataError, match=r"train.jsonl:2: " + message):
        load_datasets(RunSpec.of(data_config))
    data_config.data.skip_bad_examples = True
    loaded = load_datasets(RunSpec.of(data_config))
    assert len(loaded.train) == 2 and loaded.train.stats["dropped"] == {reason: 1}


def test_certificate_counts_per_role_and_trains_no_prompt_text():
    tokenizer = build("Qwen-Qwen2.5-7B-Instruct", [TOOL_CHAT])
    options = tok.Options("messages", "all_assistant", 4096, False)
    report = certificate.check_records(tokenizer, [Record("t.jsonl:1", TOOL_CHAT)], options)
    counts = report["categories"]
    assert report["violations"] == [] and report["documents"] == 1
    for never in ("system", "user", "tool_result"):
        assert counts[never]["trained"] == 0 and counts[never]["untrained"] > 0
    # The reply "It is 7 ." is 7 tokens (spaces are tokens here); the call
    # '<tool_call>...</tool_call>' is all tool_call; the 2 <|im_end|> closing replies are glue.
    assert counts["assistant"] == {"trained": 7, "untrained": 0}
    ((tokens, trained),) = tok.tokenize_documents(
        tokenizer, normalize(TOOL_CHAT, "messages"), options
    )[0]
    call_tokens = len(tokenizer(trained_runs(tokenizer, tokens, trained)[0],
                                add_special_tokens=False)["input_ids"]) - 1  # fmt: skip
    assert counts["tool_call"]["trained"] == call_tokens
    assert counts["glue"]["trained"] == 2
    assert sum(c["trained"] for c in counts.values()) == int(trained.sum())


# A template whose generation prompt ends in a word the reply continues ("Bot" + "Hello"):
# the word-level tokenizer makes "BotHello" one token straddling the prompt/reply boundary.
STRADDLING = ("{% for m in messages %}{% if m.role == 'user' %}{{ 'U: ' + m.content + '\\n' }}"
              "{% else %}{{ 'Bot' + m.content + '<|im_end|>' }}{% endif %}{% endfor %}"
              "{% if add_generation_prompt %}{{ 'Bot' }}{% endif %}")  # fmt: skip


def test_a_token_straddling_the_prompt_reply_edge_is_cut_there():
    """The overlap rule trains a token with any character in a span; a token of the whole text
    that straddles the edge ("BotHello") is never made: the text is cut there, the prompt
    tokenized as at inference ("Bot") and the reply on its own ("Hello"), and the check passes."""
    assert tok._overlaps([(0, 3), (3, 7), (7, 9)], [(5, 8)]).tolist() == [False, True, True]
    tokenizer = make_tokenizer("chatml", corpus="U Hi BotHello Bot Hello")
    tokenizer.chat_template = STRADDLING
    example = chat(ANSWER)
    assert "BotHello" in tokenizer.tokenize("U: Hi\nBotHello<|im_end|>")
    tokens, trained, _ = tok.tokenize_example(
        tokenizer, normalize(example, "messages"), tok.Options("messages", "all_assistant",
                                                               100, False))  # fmt: skip
    assert trained_runs(tokenizer, tokens, trained) == ["Hello<|im_end|>"]
    assert tokens.tolist() == tokenizer("U: Hi\nBot")["input_ids"] + tokenizer(
        "Hello<|im_end|>")["input_ids"]  # fmt: skip
    options = tok.Options("messages", "all_assistant", 100, False)
    report = certificate.check_records(tokenizer, [Record("t.jsonl:7", example)], options)
    assert report["violations"] == [] and report["categories"]["assistant"]["trained"] == 1


@pytest.mark.e2e
def test_inspect_check_exits_non_zero_naming_file_line_and_span(data_config, tmp_path):
    tokenizer = make_tokenizer("chatml", corpus="U Hi BotHello")
    tokenizer.chat_template = STRADDLING
    tokenizer.save_pretrained(tmp_path / "straddling")
    write_jsonl(tmp_path / "train.jsonl", [chat(ANSWER)] * 2)
    ok = certify(RunSpec.of(data_config), load_tokenizer(data_config.data.tokenizer))
    assert ok["violations"] == [] and ok["examples"] == 2
    command = [sys.executable, "-m", "sft_jax.data.inspect", f"--config={REPO}/configs/base.py",
               f"--config.data.tokenizer={tmp_path / 'straddling'}",
               f"--config.data.train_files={tmp_path / 'train.jsonl'}",
               "--config.data.eval_files=", "--check", "--json"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 1, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert report["violations"][0]["where"].endswith("train.jsonl:1")
    # The span "Hello<|im_end|>" after "U: Hi\nBot": cut from "Bot", its word "Hello" is not
    # in the vocabulary, so its tokens decode to "<unk><|im_end|>".
    assert report["violations"][0]["span"] == [9, 24]
    assert "decode to '<unk><|im_end|>'" in report["violations"][0]["problem"]


def load_tokenizer(path: str):
    from sft_jax.data import load_tokenizer as load

    return load(path)


def test_startup_check_logs_the_table(data_config, tmp_path, caplog):
    write_jsonl(tmp_path / "train.jsonl", [chat(ANSWER)] * 3)
    with caplog.at_level(logging.INFO, logger="sft_jax.data.pipeline"):
        load_datasets(RunSpec.of(data_config))
    assert "mask certificate of 3 examples" in caplog.text and "tool_result" in caplog.text


def test_reply_without_end_of_turn_token_is_warned(caplog):
    tokenizer = make_tokenizer("chatml")
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m.role + ': ' + m.content + '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    with caplog.at_level(logging.WARNING):
        tok.tokenize_example(tokenizer, normalize(chat(ANSWER), "messages"),
                             tok.Options("messages", "all_assistant", 100, False))  # fmt: skip
    assert "not an end-of-turn token" in caplog.text and "'Hello'" in caplog.text


def test_cache_key_follows_span_code_template_kwargs_and_reasoning(monkeypatch):
    tokenizer = make_tokenizer("chatml")
    options = tok.Options("messages", "all_assistant", 100, False)
    key = tok.cache_key("data", tokenizer, options)
    assert key == tok.cache_key("data", tokenizer, options)
    kwargs = tok.Options("messages", "all_assistant", 100, False, "all", '{"enable_thinking": 0}')
    reasoning = tok.Options("messages", "all_assistant", 100, False, "none")
    assert len({key, tok.cache_key("data", tokenizer, kwargs),
                tok.cache_key("data", tokenizer, reasoning)}) == 3  # fmt: skip
    other_template = make_tokenizer("chatml")
    other_template.chat_template += " "
    assert tok.cache_key("data", other_template, options) != key
    monkeypatch.setattr(tok, "code_fingerprint", lambda: "edited span code")
    assert tok.cache_key("data", tokenizer, options) != key


def test_config_template_kwargs_reach_the_template_and_examples_override_them():
    example = {**TOOL_CHAT, "messages": TOOL_CHAT["messages"][:3]}
    tokenizer = build("Qwen-Qwen3-0.6B", [example])
    no_thinking = tok.Options("messages", "all_assistant", 4096, False, "all",
                              '{"enable_thinking": false}')  # fmt: skip
    conversation = normalize(example, "messages")
    [(tokens, trained)], _ = tok.tokenize_documents(tokenizer, conversation, no_thinking)
    assert not trained_runs(tokenizer, tokens, trained)[0].startswith("<think>")
    thinking = normalize({**example, "chat_template_kwargs": {"enable_thinking": True}},
                         "messages")  # fmt: skip
    [(tokens, trained)], _ = tok.tokenize_documents(tokenizer, thinking, no_thinking)
    assert trained_runs(tokenizer, tokens, trained)[0].startswith("<think>\n\n</think>")
    assert np.sum(trained) > 0


@pytest.mark.parametrize("reasoning, trained_text", [
    ("all", "<think>\nDone .\n</think>\n\nYes<|im_end|>"), ("none", "Yes<|im_end|>")])  # fmt: skip
def test_inline_think_is_left_to_the_template(reasoning, trained_text):
    """A template that knows no reasoning (this ChatML) renders inline <think> as content."""
    tokenizer = make_tokenizer("chatml", corpus="<think> Done . </think> Yes Hi")
    example = chat({"role": "assistant", "content": "<think>\nDone .\n</think>\n\nYes"})
    tokens, trained, _ = tok.tokenize_example(
        tokenizer, normalize(example, "messages"),
        tok.Options("messages", "all_assistant", 100, False, reasoning))  # fmt: skip
    assert trained_runs(tokenizer, tokens, trained) == [trained_text]


def test_history_rewriting_expansion_is_counted_and_logged(data_config, tmp_path, caplog):
    from test_chat_templates import THINK_CHAT

    build("Qwen-Qwen3-0.6B", [THINK_CHAT]).save_pretrained(tmp_path / "qwen3")
    data_config.data.tokenizer = str(tmp_path / "qwen3")
    write_jsonl(tmp_path / "train.jsonl", [THINK_CHAT] * 3 + [chat(ANSWER)])
    loaded = load_datasets(RunSpec.of(data_config))
    stats = loaded.train.stats
    assert (stats["examples_kept"], stats["documents"]) == (4, 7)
    assert (stats["expanded_examples"], stats["expanded_documents"]) == (3, 6)
    from sft_jax.data.pipeline import summary_line

    assert "3 conversations rendered as 6 documents" in summary_line(stats)


def test_certificate_of_plain_completions():
    tokenizer = make_tokenizer("llama3")
    options = tok.Options("prompt_completion", "all_assistant", 100, False)
    value = {"prompt": "What is 2 + 3 ?", "completion": " 5"}
    report = certificate.check_records(tokenizer, [Record("t.jsonl:1", value)], options)
    counts = report["categories"]
    assert report["violations"] == []
    # " 5" is two tokens: "5" is the text, " " (whitespace around a field counts as glue) and
    # the EOS are trained glue; BOS is untrained glue.
    assert counts["assistant"] == {"trained": 1, "untrained": 0}
    assert counts["glue"] == {"trained": 2, "untrained": 1}
    assert counts["user"] == {"trained": 0, "untrained": 11}  # "What is 2 + 3 ?"


def test_config_checks_train_reasoning_and_template_kwargs():
    from sft_jax.core.errors import ConfigError
    from sft_jax.train.config_check import check_values

    config = base_config()
    config.data.train_reasoning = "some"
    with pytest.raises(
        ConfigError, match=r"data\.train_reasoning='some': expected one of all, last_turn, none"
    ):
        check_values(RunSpec.of(config), 1, 1)
    config.data.train_reasoning = "none"
    config.data.template_kwargs = '{"enable_thinking": fals'
    with pytest.raises(ConfigError, match=r"data\.template_kwargs.*a JSON object"):
        check_values(RunSpec.of(config), 1, 1)
    config.data.template_kwargs = '{"enable_thinking": false}'
    check_values(RunSpec.of(config), 1, 1)


LLAMA3_1 = "meta-llama-Llama-3.1-8B-Instruct"
LLAMA_REPLY_HEADER = "<|start_header_id|>assistant<|end_header_id|>\n\n"


def rendered_replies(tokenizer, example: dict) -> tuple[str, list[str]]:
    """The conversation as apply_chat_template renders it (tool-call arguments as objects,
    as templates take them), and each assistant reply in it: after its header through
    <|eot_id|>."""
    conversation = normalize(example, "messages")
    text = tokenizer.apply_chat_template(
        list(conversation.messages), tools=list(conversation.tools), tokenize=False
    )
    replies = [r[: r.index("<|eot_id|>")] + "<|eot_id|>" for r in text.split(LLAMA_REPLY_HEADER)]
    return text, replies[1:]


def test_text_a_template_drops_from_a_tool_turn_trains_as_rendered(data_config, tmp_path, caplog):
    """Llama 3.1 renders only the call of a turn with text and a call: that rendering trains
    (what the model reads and writes at inference), counted and warned once naming file:line."""
    tokenizer = build(LLAMA3_1, [TEXT_AND_CALL])
    tokenizer.save_pretrained(tmp_path / "llama")
    data_config.data.tokenizer = str(tmp_path / "llama")
    data_config.data.max_length = 1024  # Llama 3.1 puts the tool schemas in the user turn
    write_jsonl(tmp_path / "train.jsonl", [TOOL_CHAT, TEXT_AND_CALL, TEXT_AND_CALL])
    with caplog.at_level(logging.WARNING, logger="sft_jax.data.pipeline"):
        loaded = load_datasets(RunSpec.of(data_config))
    text, replies = rendered_replies(tokenizer, TEXT_AND_CALL)
    assert "Let me add" not in text and replies[0].startswith('{"name": "add"')
    tokens, trained = loaded.train.document(1)
    assert tokens.tolist() == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert trained_runs(loaded.tokenizer, tokens, trained) == replies
    stats = loaded.train.stats
    assert (stats["examples_kept"], stats["dropped"]) == (3, {})
    assert stats["template_dropped_content"] == 2
    assert stats["first_template_dropped_content"].endswith("train.jsonl:2")
    warnings = [r.getMessage() for r in caplog.records if "template_dropped_content" in r.message]
    assert len(warnings) == 1 and "train.jsonl:2" in warnings[0], caplog.text
    from sft_jax.data.pipeline import summary_line

    assert "2 assistant turns" in summary_line(stats)
