"""The character spans a conversation trains, derived from the chat template's own renderings.

Spans never come from `{% generation %}` markers (most stock templates lack them) nor from
searching token ids (the same text tokenizes differently in different contexts). For each
trained assistant message i:

  before  = render(messages[:i], add_generation_prompt=True)  -> "...<|im_start|>assistant\\n"
  through = render(messages[:i + 1])              -> "...<|im_start|>assistant\\nHi<|im_end|>\\n"
  reply   = through[len(before):].rstrip()        -> "Hi<|im_end|>"

`before` is exactly the prompt the model reads at inference and `reply` what it must write:
its reasoning, text and tool calls as the template renders them, and the token that ends it;
never the assistant header (the generation prompt), system, user or tool-result text, nor the
tool schemas. Each reply is verified: `before` must be a prefix of `through`, and the reply must
contain the message's content, each tool call's name and argument names (as whole words, however
the template writes them: "a": 3, a:3, <parameter=a>) and (when trained) its reasoning.

A template may leave out a field it never shows: Llama 3.1/3.2 render only the call of a turn
with text and a tool call. What the model reads and writes at inference is that rendering, so
it trains as rendered (counted as template_dropped_content), the text never trained:

  message = {"role": "assistant", "content": "Let me add .", "tool_calls": [add(a=3, b=4)]}
  reply   = '{"name": "add", "parameters": {"a": 3, "b": 4}}<|eot_id|>'    -> all trained
  masks     [0 ... 0 (prompt, header) | 1 ... 1 (the call and <|eot_id|>)]  "Let me add ." in none

The content counts as left out when rendering the turn with content "" gives the same text.
Reasoning the user asked to train (train_reasoning "all", or "last_turn" on the last turn) that
the template never renders stays refused: that training is impossible, not a rendering choice.

Templates that rewrite history (Qwen3 drops the `<think>` of turns before the last user
message) render a turn differently once later turns follow, so `through` is not a prefix of
the whole conversation. Then the conversation is expanded: such a turn gets a document of its
own, `through`, rendered exactly as at inference; turns still rendered in place share one.

What trains of the reasoning (config.data.train_reasoning): "all"; "last_turn" (only the final
assistant message's); "none" (the reasoning stays in the context, the reply trains from where
the reasoning and its closing markup end).
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

from sft_jax.data.formats import Conversation
from sft_jax.data.messages import BadExample, reasoning_and_answer
from sft_jax.data.templates import (
    TemplateError,
    render,
    special_texts,
    warn_without_end_of_turn,
)

TRAIN_REASONING = ("all", "last_turn", "none")
CLOSING = re.compile(r"\s*(?:</\w+>)?\s*")  # what closes a reasoning block: "\n</think>\n\n"
WHITESPACE = re.compile(r"\s*")


@dataclasses.dataclass
class Rendered:
    """One document's text, its trained [start, end) character spans and their messages."""

    text: str
    spans: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    turns: list[int] = dataclasses.field(default_factory=list)  # message index of each span
    # Trained turns whose text content the template leaves out (it renders their calls only).
    dropped_content: list[int] = dataclasses.field(default_factory=list)


def render_documents(
    tokenizer: Any, conversation: Conversation, train_on: str, train_reasoning: str = "all", **kw
) -> list[Rendered]:
    """The documents a conversation trains as: one, or one per history rewrite (see above);
    `kw` are the chat template's keyword arguments (an example's own override them)."""
    context = _Context(tokenizer, conversation, kw)
    full = context.render(len(context.messages), generation_prompt=False)
    if train_on == "all_tokens":
        return [Rendered(full, [(0, len(full))], [])]
    turns = trained_turns(conversation, train_on)
    last = max(i for i, m in enumerate(context.messages) if m["role"] == "assistant")
    documents = [Rendered(full)]
    for index in reversed(turns):
        before = context.render(index, generation_prompt=True)
        through = context.render(index + 1, generation_prompt=False)
        if not through.startswith(before):  # the prompt renders the context differently
            through = _as_at_inference(context, index, before, through)
        if not documents[-1].text.startswith(through):  # history rewritten: its own document
            documents.append(Rendered(through))
        reasoning_trained = train_reasoning == "all" or (
            train_reasoning == "last_turn" and index == last
        )
        span, dropped = _reply_span(context, index, before, through, reasoning_trained)
        documents[-1].spans.insert(0, span)
        documents[-1].turns.insert(0, index)
        if dropped:
            documents[-1].dropped_content.insert(0, index)
    return [d for d in reversed(documents) if d.spans]


def _as_at_inference(context: _Context, index: int, before: str, through: str) -> str:
    """The prompt `before` and the reply as the template renders it after its header, for
    templates whose prompt is not a prefix of the rendered turn (Hermes closes a final tool
    result differently; Mistral moves the system prompt into the last user message)."""
    context_text = context.render(index, generation_prompt=False)
    header = before[len(context_text) :] if before.startswith(context_text) else ""
    message = context.messages[index]
    names = [call["function"]["name"] for call in message.get("tool_calls", ())]
    reasoning, answer = (text.strip() for text in reasoning_and_answer(message))
    # Where the reply starts: its first rendered part (reasoning, text or call), or its first
    # call where it shows none (gpt-oss renders the reasoning as a message before the answer).
    shown = [p for p in (reasoning, answer, *names) if p and p in through]
    anchor = min(through.rfind(p) for p in shown) if shown else through.rfind(answer)
    if not header or through.rfind(header, 0, anchor) < 0:
        # No generation prompt to find (Mistral): the prompt ends with the message before.
        previous = context.messages[index - 1]["content"].strip() if index else ""
        header = before[before.rfind(previous) :] if previous and previous in before else ""
    start = through.rfind(header, 0, anchor) if header else -1
    if start < 0:
        raise TemplateError(
            f"the chat template does not render assistant message {index} as a continuation "
            f"of its generation prompt: the prompt ends {before[-60:]!r} but the rendered turn "
            f"continues {through[len(_common(before, through)) :][:60]!r}, so the text the "
            "model writes at inference cannot be rendered. Set config.data.chat_template to a "
            "template whose replies follow its generation prompt."
        )
    return before + through[start + len(header) :]


def trained_turns(conversation: Conversation, train_on: str) -> list[int]:
    turns = [
        i
        for i, m in enumerate(conversation.messages)
        if m["role"] == "assistant" and i >= conversation.trained_from
    ]
    if not turns:
        raise BadExample("the conversation has no assistant message to train on", "no_assistant")
    return turns[-1:] if train_on == "last_assistant" else turns


class _Context:
    """The conversation, its tools and template kwargs: renders of its prefixes."""

    def __init__(self, tokenizer: Any, conversation: Conversation, config_kwargs: dict):
        self.tokenizer = tokenizer
        self.messages = list(conversation.messages)
        self.tools = list(conversation.tools) if conversation.tools else None
        self.kwargs = {**config_kwargs, **conversation.template_kwargs}

    def render(self, count: int, generation_prompt: bool) -> str:
        """The first `count` messages rendered, with the generation prompt or without."""
        return self._render(self.messages[:count], generation_prompt)

    def _render(self, messages: list[dict], generation_prompt: bool) -> str:
        return render(self.tokenizer, messages, generation_prompt, self.tools, self.kwargs)

    def drops_content(self, index: int) -> bool:
        """Does the template leave out the text content of assistant message `index`, a turn
        that calls tools? True when the turn renders the same with content "" (Llama 3.1
        renders {"content": "Let me add .", "tool_calls": [add]} as the call alone)."""
        message = self.messages[index]
        if not message.get("tool_calls"):
            return False
        blank = [*self.messages[:index], {**message, "content": ""}]
        try:
            return self._render(blank, False) == self.render(index + 1, False)
        except BadExample:  # the template refuses an empty content: it renders it
            return False


def _reply_span(
    context: _Context, index: int, before: str, through: str, reasoning_trained: bool
) -> tuple[tuple[int, int], bool]:
    """The trained characters of assistant message `index`, verified against its fields, and
    whether the template leaves out its text content (see the module docstring)."""
    message = context.messages[index]
    reply = through[len(before) :].rstrip()
    warn_without_end_of_turn(context.tokenizer, reply)
    where = f"assistant message {index}"
    reasoning, answer = (text.strip() for text in reasoning_and_answer(message))
    dropped = bool(answer) and context.drops_content(index)
    if not dropped:
        _require(reply, answer, where, "content", "template_drops_content")
    calls_text = reply if dropped else reply.replace(answer, "", 1)  # not found in the text
    for k, call in enumerate(message.get("tool_calls", ())):
        function = call["function"]
        for text in (function["name"], *function["arguments"]):
            _require(calls_text, text, where, f"tool_calls[{k}]", "template_drops_tool_calls")
    start = len(before)
    if reasoning and reasoning_trained:
        _require(reply, reasoning, where, "reasoning_content", "template_drops_reasoning")
    elif reasoning and reasoning in reply:
        start += _reasoning_end(reply, reasoning, special_texts(context.tokenizer))
    return (start, len(before) + len(reply)), dropped


def _require(reply: str, text: str, where: str, field: str, reason: str) -> None:
    """`text` must be in the reply; a name (a tool's, an argument's) as a whole word, however
    the template writes it ("a": 3, a:3, <parameter=a>)."""
    if not _shows(reply, text):
        raise BadExample(
            f"{where}: the chat template's rendering of its reply {reply[:80]!r} leaves out its "
            f"{field} ({text[:40]!r}), so it cannot be trained as written. Use a "
            "config.data.chat_template that renders it"
            + (", or config.data.train_reasoning='none'" if field == "reasoning_content" else ""),
            reason,
        )


def _shows(reply: str, text: str) -> bool:
    if not text.isidentifier():
        return text in reply
    return re.search(rf"(?<!\w){re.escape(text)}(?!\w)", reply) is not None


def _reasoning_end(reply: str, reasoning: str, specials: list[str]) -> int:
    """Where the untrained reasoning of a reply ends: after its text and the closing tag or
    special token and whitespace that follow it ("R\n</think>\n\n", Gemma 4's "R\n<channel|>",
    gpt-oss's "R<|end|>"), so what the model writes next trains from its first token."""
    end = reply.index(reasoning) + len(reasoning)
    end = WHITESPACE.match(reply, end).end()
    closing = next((t for t in specials if reply.startswith(t, end)), None)
    if closing is None:
        return CLOSING.match(reply, end).end()
    return WHITESPACE.match(reply, end + len(closing)).end()


def _common(a: str, b: str) -> str:
    """The longest common prefix of two strings."""
    return os.path.commonprefix([a, b])  # noqa: RUF071 (characters, not path parts)
