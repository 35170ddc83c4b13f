"""The chat templates of gpt-oss, Qwen3.5, Gemma 4, DeepSeek-V3.1, SmolLM3 and OLMo 3 Think
(tests/data/templates, sources in SOURCES.md there): on plain, reasoning and tool-call
conversations the trained tokens decode to exactly the replies each template renders (its
reasoning channel, tool calls and end-of-turn token included), each document is the prompt as
the template renders it at inference followed by the reply, and what a template cannot render
is refused with the reason.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from chat_tokenizers import REAL_TEMPLATES
from test_chat_templates import CASES as OLDER_CASES
from test_chat_templates import (
    PLAIN_CHAT,
    SYSTEM,
    TEXT_AND_CALL,
    TOOL_CHAT,
    TOOL_TURNS,
    TOOLS,
    build,
    options,
    trained_runs,
)

from sft_jax.data import TemplateError, certificate
from sft_jax.data import tokenize as tok
from sft_jax.data.formats import normalize
from sft_jax.data.messages import BadExample
from sft_jax.data.records import Record
from sft_jax.data.spans import render_documents

# Reasoning as a field of each reply (gpt-oss reads it as `thinking`, transformers passes both).
REASONING_CHAT = {"messages": [
    {"role": "user", "content": "What is 2 + 2 ?"},
    {"role": "assistant", "reasoning_content": "Two and two make four .", "content": "4"},
    {"role": "user", "content": "And 3 + 3 ?"},
    {"role": "assistant", "reasoning_content": "Three and three make six .", "content": "6"},
]}  # fmt: skip
# Reasoning inline at the start of each reply (SmolLM3, OLMo 3 Think read only `content`).
INLINE_CHAT = {"messages": [
    {"role": "user", "content": "What is 2 + 2 ?"},
    {"role": "assistant", "content": "<think>\nTwo and two make four .\n</think>\n\n4"},
    {"role": "user", "content": "And 3 + 3 ?"},
    {"role": "assistant", "content": "<think>\nThree and three make six .\n</think>\n\n6"},
]}  # fmt: skip
REASONING_TOOL_CHAT = {"tools": TOOLS, "messages": [
    SYSTEM, TOOL_TURNS[0], {**TOOL_TURNS[1], "reasoning_content": "Use the tool ."},
    TOOL_TURNS[2], {**TOOL_TURNS[3], "reasoning_content": "Read the result ."},
]}  # fmt: skip

GPT_OSS, QWEN3_5, GEMMA4 = "openai-gpt-oss-120b", "Qwen-Qwen3.5-4B", "google-gemma-4-E2B-it"
DEEPSEEK_V3_1, SMOLLM3 = "deepseek-ai-DeepSeek-V3.1", "HuggingFaceTB-SmolLM3-3B"
OLMO3 = "allenai-Olmo-3-32B-Think"

# gpt-oss (harmony): the generation prompt is "<|start|>assistant"; a reply is its channel
# header, message and <|return|> (<|call|> for a tool call, addressed " to=functions.add").
# The analysis channel is a message of its own before the final one; "none" trains from the
# next message's <|start|>. Earlier turns end in <|end|> and lose their analysis: each reply
# is a document of its own, as at inference.
FINAL = "<|channel|>final<|message|>{}<|return|>"
ANALYSIS = "<|channel|>analysis<|message|>{}<|end|><|start|>assistant"
CALL = ' to=functions.add<|channel|>commentary json<|message|>{"a": 3, "b": 4}<|call|>'
# Qwen3.5: the generation prompt opens "<think>\n"; replies after the last user message close
# the empty block ("\n</think>\n\n"), their first "\n" tokenized apart from the prompt's.
QWEN_CALL = ("<tool_call>\n<function=add>\n<parameter=a>\n3\n</parameter>\n<parameter=b>\n4\n"
             "</parameter>\n</function>\n</tool_call><|im_end|>")  # fmt: skip
NO_THINK = "\n</think>\n\n"
# Gemma 4: thought channel; the call ends in <|tool_response>, the results follow inside the
# same model turn and the answer continues it.
GEMMA_CALL = "<|tool_call>call:add{a:3,b:4}<tool_call|><|tool_response>"
THOUGHT = "<|channel>thought\n{}\n<channel|>"
DS_CALL = ('<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>add<｜tool▁sep｜>{"a": 3, "b": 4}'
           "<｜tool▁call▁end｜><｜tool▁calls▁end｜><｜end▁of▁sentence｜>")  # fmt: skip
DS_EOS = "<｜end▁of▁sentence｜>"

# (template, example, train_reasoning, template kwargs) -> trained text of each document.
CASES = {
    "gpt_oss_plain": (GPT_OSS, PLAIN_CHAT, "all", {},
                      [[FINAL.format("Hello !")], [FINAL.format("Fine thanks .")]]),
    "gpt_oss_tools": (GPT_OSS, TOOL_CHAT, "all", {}, [[CALL, FINAL.format("It is 7 .")]]),
    "gpt_oss_reasoning": (GPT_OSS, REASONING_CHAT, "all", {}, [
        [ANALYSIS.format("Two and two make four .") + FINAL.format("4")],
        [ANALYSIS.format("Three and three make six .") + FINAL.format("6")]]),
    "gpt_oss_reasoning_none": (GPT_OSS, REASONING_CHAT, "none", {},
                               [["<|start|>assistant" + FINAL.format("4")],
                                ["<|start|>assistant" + FINAL.format("6")]]),
    # The calling turn's analysis stays in the prompt of the answer (the template keeps it
    # until a final message follows): one document, rendered as at inference.
    "gpt_oss_reasoning_tools": (GPT_OSS, REASONING_TOOL_CHAT, "all", {}, [[
        ANALYSIS.format("Use the tool .") + CALL,
        ANALYSIS.format("Read the result .") + FINAL.format("It is 7 .")]]),
    "gpt_oss_reasoning_tools_last_turn": (GPT_OSS, REASONING_TOOL_CHAT, "last_turn", {}, [[
        "<|start|>assistant" + CALL,
        ANALYSIS.format("Read the result .") + FINAL.format("It is 7 .")]]),
    # Text beside a call goes to the analysis channel, where it trains.
    "gpt_oss_text_and_call": (GPT_OSS, TEXT_AND_CALL, "all", {}, [[
        ANALYSIS.format("Let me add .") + CALL, FINAL.format("It is 7 .")]]),
    "qwen3_5_plain": (QWEN3_5, PLAIN_CHAT, "all", {},
                      [[NO_THINK + "Hello !<|im_end|>"], [NO_THINK + "Fine thanks .<|im_end|>"]]),
    "qwen3_5_tools": (QWEN3_5, TOOL_CHAT, "all", {},
                      [[NO_THINK + QWEN_CALL, NO_THINK + "It is 7 .<|im_end|>"]]),
    "qwen3_5_tools_no_thinking": (QWEN3_5, TOOL_CHAT, "all", {"enable_thinking": False},
                                  [[QWEN_CALL, "It is 7 .<|im_end|>"]]),
    "qwen3_5_reasoning": (QWEN3_5, REASONING_CHAT, "all", {}, [
        ["Two and two make four .\n</think>\n\n4<|im_end|>"],
        ["Three and three make six .\n</think>\n\n6<|im_end|>"]]),
    "qwen3_5_reasoning_none": (QWEN3_5, REASONING_CHAT, "none", {},
                               [["4<|im_end|>"], ["6<|im_end|>"]]),
    "qwen3_5_reasoning_tools": (QWEN3_5, REASONING_TOOL_CHAT, "all", {}, [[
        "Use the tool .\n</think>\n\n" + QWEN_CALL,
        "Read the result .\n</think>\n\nIt is 7 .<|im_end|>"]]),
    "gemma4_plain": (GEMMA4, PLAIN_CHAT, "all", {}, [["Hello !<turn|>", "Fine thanks .<turn|>"]]),
    "gemma4_tools": (GEMMA4, TOOL_CHAT, "all", {}, [[GEMMA_CALL, "It is 7 .<turn|>"]]),
    "gemma4_reasoning": (GEMMA4, REASONING_CHAT, "all", {}, [
        [THOUGHT.format("Two and two make four .") + "4<turn|>"],
        [THOUGHT.format("Three and three make six .") + "6<turn|>"]]),
    "gemma4_reasoning_none": (GEMMA4, REASONING_CHAT, "none", {},
                              [["4<turn|>"], ["6<turn|>"]]),
    "gemma4_reasoning_tools": (GEMMA4, REASONING_TOOL_CHAT, "all", {}, [[
        THOUGHT.format("Use the tool .") + GEMMA_CALL,
        THOUGHT.format("Read the result .") + "It is 7 .<turn|>"]]),
    # With thinking on, the prompt after tool results opens the thought channel itself.
    "gemma4_reasoning_tools_thinking": (GEMMA4, REASONING_TOOL_CHAT, "all",
                                        {"enable_thinking": True}, [[
        THOUGHT.format("Use the tool .") + GEMMA_CALL,
        "Read the result .\n<channel|>It is 7 .<turn|>"]]),
    "deepseek_v3_1_plain": (DEEPSEEK_V3_1, PLAIN_CHAT, "all", {},
                            [["Hello !" + DS_EOS, "Fine thanks ." + DS_EOS]]),
    "deepseek_v3_1_tools": (DEEPSEEK_V3_1, TOOL_CHAT, "all", {}, [[DS_CALL, "It is 7 ." + DS_EOS]]),
    "deepseek_v3_1_text_and_call": (DEEPSEEK_V3_1, TEXT_AND_CALL, "all", {},
                                    [["Let me add ." + DS_CALL, "It is 7 ." + DS_EOS]]),
    # The template never renders reasoning (it cuts content up to </think>): answers train.
    "deepseek_v3_1_reasoning_none": (DEEPSEEK_V3_1, REASONING_CHAT, "none", {},
                                     [["4" + DS_EOS, "6" + DS_EOS]]),
    "deepseek_v3_1_thinking_none": (DEEPSEEK_V3_1, INLINE_CHAT, "none", {"thinking": True},
                                    [["</think>\n\n4" + DS_EOS, "</think>\n\n6" + DS_EOS]]),
    "smollm3_plain": (SMOLLM3, PLAIN_CHAT, "all", {},
                      [["Hello !<|im_end|>", "Fine thanks .<|im_end|>"]]),
    "smollm3_plain_no_thinking": (SMOLLM3, PLAIN_CHAT, "all", {"enable_thinking": False},
                                  [["Hello !<|im_end|>", "Fine thanks .<|im_end|>"]]),
    "smollm3_inline_reasoning": (SMOLLM3, INLINE_CHAT, "all", {}, [[
        "<think>\nTwo and two make four .\n</think>\n\n4<|im_end|>",
        "<think>\nThree and three make six .\n</think>\n\n6<|im_end|>"]]),
    "smollm3_inline_reasoning_none": (SMOLLM3, INLINE_CHAT, "none", {},
                                      [["4<|im_end|>", "6<|im_end|>"]]),
    # OLMo 3 Think: the prompt opens <think>; the last turn ends in eos (<|endoftext|>), earlier
    # ones in <|im_end|>: each reply is a document of its own, ending as at inference.
    "olmo3_inline_reasoning": (OLMO3, INLINE_CHAT, "all", {}, [
        ["\nTwo and two make four .\n</think>\n\n4<|endoftext|>"],
        ["\nThree and three make six .\n</think>\n\n6<|endoftext|>"]]),
    "olmo3_inline_reasoning_none": (OLMO3, INLINE_CHAT, "none", {},
                                    [["4<|endoftext|>"], ["6<|endoftext|>"]]),
}  # fmt: skip


def run_case(case: str):
    name, example, reasoning, kwargs, _ = CASES[case]
    tokenizer = build(name, [example], kwargs)
    conversation = normalize(example, "messages")
    kwargs_json = json.dumps(kwargs) if kwargs else ""
    documents, notes = tok.tokenize_documents(
        tokenizer, conversation, options(reasoning, kwargs_json)
    )
    rendered = render_documents(tokenizer, conversation, "all_assistant", reasoning, **kwargs)
    return tokenizer, conversation, documents, notes, rendered


@pytest.mark.parametrize("case", sorted(CASES))
def test_trained_tokens_are_exactly_the_rendered_replies(case):
    kwargs, expected = CASES[case][3:]
    tokenizer, conversation, documents, notes, rendered = run_case(case)
    assert tokenizer.unk_token_id not in np.concatenate([t for t, _ in documents])
    assert [trained_runs(tokenizer, t, m) for t, m in documents] == expected
    assert notes["template_dropped_content"] == 0  # these templates show every reply's text
    messages = list(conversation.messages)
    for (tokens, trained), document in zip(documents, rendered, strict=True):
        # The document is its tokens; it begins with the prompt of its first trained turn as
        # the template renders it at inference (generation prompt included), its tokens those
        # of that prompt alone, and its last turn follows its own prompt as at inference.
        assert tokenizer.decode(tokens.tolist()) == document.text
        first, last = (
            tokenizer.apply_chat_template(
                messages[:turn], tools=conversation.tools, tokenize=False,
                add_generation_prompt=True, **kwargs)
            for turn in (document.turns[0], document.turns[-1])
        )  # fmt: skip
        prompt_ids = tokenizer(first, add_special_tokens=False)["input_ids"]
        assert tokens[: len(prompt_ids)].tolist() == prompt_ids
        assert document.text.startswith(last)
        # Nothing of the system prompt, the user, the tool results or the schemas trains.
        text = "".join(trained_runs(tokenizer, tokens, trained))
        for message in messages:
            if message["role"] != "assistant":
                assert message["content"] not in text.replace("It is 7", "")
        assert "Add two numbers" not in text


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_start_up_certificate_finds_no_violation(case):
    """What training checks at start-up: every trained span is exactly its tokens, no system,
    user or tool-result token trains."""
    name, example, reasoning, kwargs, _ = CASES[case]
    tokenizer = build(name, [example], kwargs)
    kwargs_json = json.dumps(kwargs) if kwargs else ""
    report = certificate.check_records(
        tokenizer, [Record("t.jsonl:1", example)], options(reasoning, kwargs_json)
    )
    assert report["violations"] == [] and report["skipped"] == {}
    assert report["categories"]["assistant"]["trained"] > 0
    for never in ("system", "user", "tool_result"):
        assert report["categories"][never]["trained"] == 0


def test_in_place_replies_are_the_whole_rendering():
    """Where every reply trains in place, the one document is the template's rendering of the
    whole conversation (apply_chat_template), not a reconstruction."""
    for case in ("gpt_oss_tools", "qwen3_5_tools", "gemma4_reasoning_tools",
                 "deepseek_v3_1_text_and_call", "smollm3_inline_reasoning"):  # fmt: skip
        kwargs = CASES[case][3]
        tokenizer, conversation, [(tokens, _)], _, _ = run_case(case)
        whole = tokenizer.apply_chat_template(
            list(conversation.messages), tools=conversation.tools, tokenize=False, **kwargs
        )
        assert tokenizer.decode(tokens.tolist()) == whole, case


def refused(name: str, example: dict, reasoning: str = "all", **kwargs):
    tokenizer = build(name, [example], kwargs)
    return lambda: render_documents(
        tokenizer, normalize(example, "messages"), "all_assistant", reasoning, **kwargs
    )


@pytest.mark.parametrize("name, example, reason", [
    # DeepSeek-V3.1 and SmolLM3 never render a reasoning field; V3.1 cuts inline reasoning.
    (DEEPSEEK_V3_1, REASONING_CHAT, "template_drops_reasoning"),
    (DEEPSEEK_V3_1, INLINE_CHAT, "template_drops_reasoning"),
    (SMOLLM3, REASONING_CHAT, "template_drops_reasoning"),
    # SmolLM3 and OLMo 3 render no tool_calls field (OLMo 3 reads `function_calls` text).
    (SMOLLM3, TOOL_CHAT, "template_drops_tool_calls"),
    (OLMO3, {"messages": [TOOL_TURNS[0], {**TOOL_TURNS[1], "content": "<think>\nAdd .\n</think>"}]},
     "template_drops_tool_calls"),
])  # fmt: skip
def test_what_a_template_never_renders_is_refused(name, example, reason):
    with pytest.raises(BadExample, match="leaves out its") as error:
        refused(name, example)()
    assert error.value.reason == reason


def test_replies_that_do_not_follow_the_generation_prompt_are_refused():
    """OLMo 3 Think's generation prompt opens <think>, which a reply without inline reasoning
    never holds; Gemma 4 renders a calling turn's text after the tool results
    and closes the turn, so the answer after it has no prompt to follow."""
    for name, example, kwargs in [(OLMO3, PLAIN_CHAT, {}), (OLMO3, REASONING_CHAT, {}),
                                  (GEMMA4, TEXT_AND_CALL, {})]:  # fmt: skip
        with pytest.raises(TemplateError, match="continuation of its generation prompt"):
            refused(name, example, **kwargs)()


def test_every_real_template_is_tested():
    tested = {case[0] for case in [*CASES.values(), *OLDER_CASES.values()]}
    assert tested | {"deepseek-ai-DeepSeek-R1-Distill-Qwen-32B"} == set(REAL_TEMPLATES)


def test_a_call_whose_argument_names_are_left_out_is_refused():
    """Argument names count as shown written any way ("a": 3, a:3, <parameter=a>), but only as
    whole words: a template that renders the call's name and values without them is refused."""
    from chat_tokenizers import make_tokenizer

    example = {"tools": TOOLS, "messages": TOOL_TURNS[:2]}
    tokenizer = make_tokenizer("chatml", corpus="add call ab 3 4 { } ( ) , : What is + ?")
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
        "{% for c in m.tool_calls or [] %}call {{ c.function.name }}{{ '(' }}"
        "{% for k, v in c.function.arguments.items() %}{{ 'a' + k + ':' }}{{ v }},{% endfor %})"
        "{% endfor %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    conversation = normalize(example, "messages")
    with pytest.raises(BadExample, match=r"leaves out its tool_calls\[0\] \('a'\)") as error:
        render_documents(tokenizer, conversation, "all_assistant")
    assert error.value.reason == "template_drops_tool_calls"
    tokenizer.chat_template = tokenizer.chat_template.replace("'a' + k", "k")
    [document] = render_documents(tokenizer, conversation, "all_assistant")
    assert [document.text[a:b] for a, b in document.spans] == ["call add(a:3,b:4,)<|im_end|>"]


def test_a_token_across_the_prompt_reply_edge_is_cut_there():
    """Qwen3.5's prompt ends "<think>\\n" and the reply begins "\\n</think>": as one text the
    two newlines are one token. The document is cut at the edge: the prompt tokenizes as it
    does alone at inference, the reply as it does alone, and the decoded text is unchanged."""
    from sft_jax.data.boundaries import encode

    tokenizer, _, [(tokens, _), _], _, [document, _] = run_case("qwen3_5_plain")
    [(start, end)] = document.spans  # the reply "\n</think>\n\nHello !<|im_end|>"
    whole = tokenizer(document.text, add_special_tokens=False, return_offsets_mapping=True)
    assert any(a < start < b for a, b in whole["offset_mapping"])  # "\n\n" straddles
    ids, offsets = encode(tokenizer, document.text, document.spans)
    prompt = tokenizer(document.text[:start], add_special_tokens=False)["input_ids"]
    reply = tokenizer(document.text[start:], add_special_tokens=False)["input_ids"]
    assert ids == prompt + reply == tokens.tolist() and document.text[end:] == "\n"
    assert not any(a < edge < b for a, b in offsets for edge in (start, end))
    assert tokenizer.decode(ids) == document.text


@pytest.mark.parametrize("case, trl_template, prompt_end, tail", [
    ("gpt_oss_tools", "gptoss_training", "<|start|>assistant", ""),
    ("qwen3_5_reasoning_tools", "qwen3_5_think_training", "<think>\n", "\n"),
])  # fmt: skip
def test_trl_generation_markers_mark_the_same_replies_and_the_generation_prompt(
    case, trl_template, prompt_end, tail
):
    """TRL's training copies of these templates put {% generation %} around the assistant
    output; transformers' return_assistant_tokens_mask then gives the same tokens and marks
    each of our trained replies plus the end of its generation prompt, which TRL trains and
    this project leaves to the prompt (and Qwen3.5's newline after <|im_end|>)."""
    from pathlib import Path

    import trl

    tokenizer, conversation, [(tokens, trained)], _, _ = run_case(case)
    reference_template = Path(trl.__file__).parent / "chat_templates" / f"{trl_template}.jinja"
    tokenizer.chat_template = reference_template.read_text(encoding="utf-8")
    reference = tokenizer.apply_chat_template(
        list(conversation.messages), tools=list(conversation.tools), tokenize=True,
        return_dict=True, return_assistant_tokens_mask=True)  # fmt: skip
    assert reference["input_ids"] == tokens.tolist()
    ours = trained_runs(tokenizer, tokens, trained)
    marked = np.asarray(reference["assistant_masks"], bool)
    assert trained_runs(tokenizer, tokens, marked) == [prompt_end + r + tail for r in ours]
    assert len(ours) == 2
