"""Reasoning and tool-call conversations through real chat templates: what trains, exactly.

The templates are the models' own (tests/data/templates, sources in SOURCES.md there), with
tiny local word-level tokenizers holding each model's special tokens. For every template the
trained tokens, decoded, must be exactly the assistant text, reasoning and tool-call text as
that template renders them, and the end-of-turn token; nothing of the system prompt, the user,
the tool results or the tool schemas.
"""

from __future__ import annotations

import contextlib
import copy
import json

import numpy as np
import pytest
from chat_tokenizers import real_template_tokenizer

from sft_jax.data import TemplateError
from sft_jax.data import tokenize as tok
from sft_jax.data.formats import normalize
from sft_jax.data.messages import BadExample
from sft_jax.data.spans import render_documents

TOOLS = [{"type": "function", "function": {
    "name": "add", "description": "Add two numbers .",
    "parameters": {"type": "object", "required": ["a", "b"], "properties": {
        "a": {"type": "integer", "description": "first"},
        "b": {"type": "integer", "description": "second"}}}}}]  # fmt: skip
CALL = {"type": "function", "id": "call00001",  # 9 characters, as Mistral's templates demand
        "function": {"name": "add", "arguments": '{"a": 3, "b": 4}'}}  # fmt: skip
SYSTEM = {"role": "system", "content": "Be brief ."}
TOOL_TURNS = [
    {"role": "user", "content": "What is 3 + 4 ?"},
    {"role": "assistant", "content": "", "tool_calls": [CALL]},
    {"role": "tool", "content": "7", "tool_call_id": "call00001", "name": "add"},
    {"role": "assistant", "content": "It is 7 ."},
]
TOOL_CHAT = {"tools": TOOLS, "messages": [SYSTEM, *TOOL_TURNS]}
# A calling turn with text too: Llama 3.1/3.2's templates render its call alone.
TEXT_AND_CALL = {"tools": TOOLS, "messages": [SYSTEM, TOOL_TURNS[0],
                 {**TOOL_TURNS[1], "content": "Let me add ."}, *TOOL_TURNS[2:]]}  # fmt: skip
THINK_CHAT = {"messages": [
    {"role": "user", "content": "What is 2 + 2 ?"},
    {"role": "assistant", "reasoning_content": "Two and two make four .", "content": "4"},
    {"role": "user", "content": "And 3 + 3 ?"},
    {"role": "assistant", "content": "<think>\nThree and three make six .\n</think>\n\n6"},
]}  # fmt: skip
PLAIN_CHAT = {"messages": [
    SYSTEM, {"role": "user", "content": [{"type": "text", "text": "Hi !"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "Hello !"}]},
    {"role": "user", "content": "How are you ?"}, {"role": "assistant", "content": "Fine thanks ."},
]}  # fmt: skip
QWEN_CALL = '<tool_call>\n{"name": "add", "arguments": {"a": 3, "b": 4}}\n</tool_call><|im_end|>'
EMPTY_THINK = "<think>\n\n</think>\n\n"
THINK_1 = "<think>\nTwo and two make four .\n</think>\n\n"
THINK_2 = "<think>\nThree and three make six .\n</think>\n\n"

# (template, example, train_reasoning, template kwargs) -> trained text of each document.
CASES = {
    # Qwen3 renders an empty <think> block on the final turn only: the tool-call turn is a
    # document of its own, rendered as at inference (history rewriting, expanded).
    "qwen3_tools": ("Qwen-Qwen3-0.6B", TOOL_CHAT, "all", {},
                    [[EMPTY_THINK + QWEN_CALL], [EMPTY_THINK + "It is 7 .<|im_end|>"]]),
    # enable_thinking=False puts the empty block in the generation prompt: it never trains.
    "qwen3_tools_no_thinking": ("Qwen-Qwen3-0.6B", TOOL_CHAT, "all", {"enable_thinking": False},
                                [[QWEN_CALL], ["It is 7 .<|im_end|>"]]),
    # Qwen3 drops the reasoning of turns before the last user message: two documents.
    "qwen3_reasoning": ("Qwen-Qwen3-0.6B", THINK_CHAT, "all", {},
                        [[THINK_1 + "4<|im_end|>"], [THINK_2 + "6<|im_end|>"]]),
    "qwen3_reasoning_last_turn": ("Qwen-Qwen3-0.6B", THINK_CHAT, "last_turn", {},
                                  [["4<|im_end|>"], [THINK_2 + "6<|im_end|>"]]),
    "qwen3_reasoning_none": ("Qwen-Qwen3-0.6B", THINK_CHAT, "none", {},
                             [["4<|im_end|>"], ["6<|im_end|>"]]),
    "qwen2_5_tools": ("Qwen-Qwen2.5-7B-Instruct", TOOL_CHAT, "all", {},
                      [[QWEN_CALL, "It is 7 .<|im_end|>"]]),
    "llama3_1_tools": ("meta-llama-Llama-3.1-8B-Instruct", TOOL_CHAT, "all", {},
                       [['{"name": "add", "parameters": {"a": 3, "b": 4}}<|eot_id|>',
                         "It is 7 .<|eot_id|>"]]),
    "llama3_2_tools": ("meta-llama-Llama-3.2-3B-Instruct", TOOL_CHAT, "all", {},
                       [['{"name": "add", "parameters": {"a": 3, "b": 4}}<|eot_id|>',
                         "It is 7 .<|eot_id|>"]]),
    "mistral_v0_3_tools": ("mistralai-Mistral-7B-Instruct-v0.3",
                           {"tools": TOOLS, "messages": TOOL_TURNS}, "all", {},
                           [['[TOOL_CALLS] [{"name": "add", "arguments": {"a": 3, "b": 4}, '
                             '"id": "call00001"}]</s>', " It is 7 .</s>"]]),
    "mistral_nemo_tools": ("mistralai-Mistral-Nemo-Instruct-2407",
                           {"tools": TOOLS, "messages": TOOL_TURNS}, "all", {},
                           [['[TOOL_CALLS][{"name": "add", "arguments": {"a": 3, "b": 4}, '
                             '"id": "call00001"}]</s>', "It is 7 .</s>"]]),
    # Mistral's templates put the system prompt into the last user message, and only when it
    # ends the conversation (at inference): each turn is rendered as the model then reads it.
    "mistral_v0_3_system_tools": ("mistralai-Mistral-7B-Instruct-v0.3", TOOL_CHAT, "all", {},
                                  [['[TOOL_CALLS] [{"name": "add", "arguments": {"a": 3, "b": 4}'
                                    ', "id": "call00001"}]</s>'], [" It is 7 .</s>"]]),
    "mistral_nemo_system_plain": ("mistralai-Mistral-Nemo-Instruct-2407", PLAIN_CHAT, "all", {},
                                  [["Hello !</s>"], ["Fine thanks .</s>"]]),
    # Hermes closes a final tool result otherwise than one a reply follows: the document is
    # the prompt as at inference (generation prompt included) and the reply after it.
    "hermes_tools": ("NousResearch-Hermes-3-Llama-3.1-8B-tool_use", TOOL_CHAT, "all", {},
                     [[QWEN_CALL, "It is 7 .<|im_end|>"]]),
    # Llama 2 puts a space before each reply and one before </s>: both are the reply's.
    "llama2_plain": ("meta-llama-Llama-2-7b-chat-hf", PLAIN_CHAT, "all", {},
                     [[" Hello ! </s>", " Fine thanks . </s>"]]),
    "gemma3_plain": ("google-gemma-3-it", PLAIN_CHAT, "all", {},
                     [["Hello !<end_of_turn>", "Fine thanks .<end_of_turn>"]]),
    # Gemma 3 renders no reasoning: with train_reasoning="none" the answers train.
    "gemma3_reasoning_none": ("google-gemma-3-it", THINK_CHAT, "none", {},
                              [["4<end_of_turn>", "6<end_of_turn>"]]),
}  # fmt: skip


def build(name: str, examples: list[dict], kwargs: dict | None = None):
    """The template's tokenizer, its vocabulary taken from the renderings of `examples`."""
    bare = real_template_tokenizer(name, "")
    corpus = []
    for example in examples:
        conversation = normalize(example, "messages")
        messages = list(conversation.messages)
        for count in range(1, len(messages) + 1):
            for prompt in (False, True):
                # A template may refuse a prefix (roles must alternate).
                with contextlib.suppress(Exception):
                    corpus.append(bare.apply_chat_template(
                        messages[:count], tools=conversation.tools, tokenize=False,
                        add_generation_prompt=prompt, **(kwargs or {})))  # fmt: skip
    return real_template_tokenizer(name, "".join(corpus))


def trained_runs(tokenizer, tokens: np.ndarray, trained: np.ndarray) -> list[str]:
    """The decoded text of each run of trained tokens."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], trained.astype(int), [0]])))
    return [
        tokenizer.decode(tokens[a:b].tolist()) for a, b in zip(edges[::2], edges[1::2], strict=True)
    ]


def options(train_reasoning: str = "all", kwargs: str = "") -> tok.Options:
    return tok.Options("messages", "all_assistant", 4096, False, train_reasoning, kwargs)


@pytest.mark.parametrize("case", sorted(CASES))
def test_trained_tokens_are_exactly_the_rendered_replies(case):
    name, example, reasoning, kwargs, expected = CASES[case]
    tokenizer = build(name, [example], kwargs)
    conversation = normalize(example, "messages")
    documents, _ = tok.tokenize_documents(
        tokenizer, conversation, options(reasoning, json.dumps(kwargs) if kwargs else "")
    )
    assert tokenizer.unk_token_id not in np.concatenate([t for t, _ in documents])
    assert [trained_runs(tokenizer, t, m) for t, m in documents] == expected
    # Nothing of the system prompt, the user, the tool results or the schemas trains.
    for tokens, trained in documents:
        text = "".join(trained_runs(tokenizer, tokens, trained))
        for message in conversation.messages:
            if message["role"] != "assistant":
                assert message["content"] not in text.replace("It is 7", "")
        assert "Add two numbers" not in text


def test_deepseek_r1_template_is_refused_with_the_reason():
    """R1's generation prompt opens (and, without enable_thinking, closes) a <think> block its
    rendering of a reply never holds (it cuts everything up to </think>), so no rendering is
    what the model reads and writes at inference: refused, never silently mis-trained."""
    name = "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B"
    tokenizer = build(name, [THINK_CHAT])
    with pytest.raises(TemplateError, match=r"generation prompt.*<think>"):
        render_documents(tokenizer, normalize(THINK_CHAT, "messages"), "all_assistant")


def test_template_that_drops_reasoning_or_tool_calls_is_a_bad_example():
    tokenizer = build("google-gemma-3-it", [THINK_CHAT])
    with pytest.raises(BadExample, match="leaves out its reasoning_content") as error:
        render_documents(tokenizer, normalize(THINK_CHAT, "messages"), "all_assistant")
    assert error.value.reason == "template_drops_reasoning"
    # Gemma 3's template ignores tool calls.
    calling = {"messages": [TOOL_TURNS[0], {**TOOL_TURNS[1], "content": "Let me add ."}]}
    tokenizer = build("google-gemma-3-it", [calling])
    with pytest.raises(BadExample, match=r"assistant message 1: .* leaves out its tool_calls"):
        render_documents(tokenizer, normalize(calling, "messages"), "all_assistant")


@pytest.mark.parametrize("name", ["meta-llama-Llama-3.1-8B-Instruct",
                                  "meta-llama-Llama-3.2-3B-Instruct"])  # fmt: skip
def test_reasoning_a_template_never_renders_is_refused_when_asked_for(name):
    """Llama 3.1/3.2 render a turn with reasoning, text and a call as the call alone. The
    text trains as rendered (the template's choice); reasoning the user asks to train cannot
    be, so train_reasoning="all" is still refused; "none" trains the call."""
    calling = {"messages": [TOOL_TURNS[0], {**TOOL_TURNS[1], "content": "Let me add .",
                                            "reasoning_content": "Use the tool ."}]}  # fmt: skip
    tokenizer, conversation = build(name, [calling]), normalize(calling, "messages")
    with pytest.raises(BadExample, match=r"leaves out its reasoning_content") as error:
        render_documents(tokenizer, conversation, "all_assistant", "all")
    assert error.value.reason == "template_drops_reasoning"
    [(tokens, trained)], notes = tok.tokenize_documents(tokenizer, conversation, options("none"))
    assert trained_runs(tokenizer, tokens, trained) == [
        '{"name": "add", "parameters": {"a": 3, "b": 4}}<|eot_id|>'
    ]
    assert notes["template_dropped_content"] == 1


# Copies of two real templates with {% generation %} markers around what the model writes
# (the tool-call loop and the plain reply); transformers' return_assistant_tokens_mask must
# then give the same mask as our spans.
GENERATION_MARKERS = {
    "mistralai-Mistral-7B-Instruct-v0.3": [
        ('{{- "[TOOL_CALLS] [" }}', "{%- endfor %}"),
        ('{{- " " + message["content"]|trim + eos_token}}', ""),
    ],
    "mistralai-Mistral-Nemo-Instruct-2407": [
        ('{{- "[TOOL_CALLS][" }}', "{%- endfor %}"),
        ('{{- message["content"] + eos_token}}', ""),
    ],
}


def with_generation_markers(template: str, name: str) -> str:
    """`template` with each (start, end) range of GENERATION_MARKERS[name] inside markers: from
    the start text through the first `end` text after it (or through the start text)."""
    for start, end in GENERATION_MARKERS[name]:
        assert template.count(start) == 1, start
        a = template.index(start)
        b = template.index(end, a) + len(end) if end else a + len(start)
        template = (template[:a] + "{% generation %}" + template[a:b] + "{% endgeneration %}"
                    + template[b:])  # fmt: skip
    return template


@pytest.mark.parametrize("name", sorted(GENERATION_MARKERS))
def test_generation_markers_give_the_same_mask_through_transformers(name):
    example = {"tools": TOOLS, "messages": TOOL_TURNS}
    tokenizer = build(name, [example])
    conversation = normalize(example, "messages")
    [(tokens, trained)] = tok.tokenize_documents(tokenizer, conversation, options())[0]
    marked = copy.deepcopy(tokenizer)
    marked.chat_template = with_generation_markers(tokenizer.chat_template, name)
    reference = marked.apply_chat_template(
        list(conversation.messages), tools=list(conversation.tools), tokenize=True,
        return_dict=True, return_assistant_tokens_mask=True,
    )  # fmt: skip
    np.testing.assert_array_equal(reference["input_ids"], tokens)
    np.testing.assert_array_equal(np.asarray(reference["assistant_masks"], bool), trained)
    assert trained.sum() > 10


# test_reasoning_templates.py checks that every real template is tested, these and its own.
