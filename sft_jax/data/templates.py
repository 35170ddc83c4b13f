"""Chat templates: which one renders a conversation, and the character spans it trains.

Spans are derived from the rendering itself, never from `{% generation %}` markers (most stock
templates lack them) nor from searching token ids (the same text tokenizes differently in
different contexts). For assistant turn i:

  before  = render(messages[:i], add_generation_prompt=True)  -> "...<|im_start|>assistant\\n"
  through = render(messages[:i + 1])              -> "...<|im_start|>assistant\\nHi<|im_end|>\\n"
  reply   = through[len(before):].rstrip()        -> "Hi<|im_end|>"

so the reply span holds the reply and the token that ends it, and not the assistant header
(the generation prompt). Each step is verified: `before` must be a prefix of `through`, which
must be a prefix of the whole rendering, and the reply text must contain the message content.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sft_jax.data.formats import BadExample, Conversation
from sft_jax.data.records import DataError

# A ChatML template for tokenizers that have none (config.data.chat_template = "chatml").
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
BUILTIN_TEMPLATES = {"chatml": CHATML}
TRAIN_ON = ("all_assistant", "last_assistant", "all_tokens")


class TemplateError(DataError):
    """The chat template cannot give verified assistant spans."""


def resolve_chat_template(spec: str) -> str:
    """config.data.chat_template -> template text: a built-in name, a .jinja file, or the text."""
    if spec in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[spec]
    if spec.endswith((".jinja", ".j2", ".txt")):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise TemplateError(f"config.data.chat_template: {spec} is not a file.")
        return path.read_text(encoding="utf-8")
    if "{%" in spec or "{{" in spec:
        return spec
    raise TemplateError(
        f"config.data.chat_template={spec!r}: expected '' (the tokenizer's own), "
        f"{', '.join(repr(k) for k in BUILTIN_TEMPLATES)}, a .jinja file or a Jinja template."
    )


def load_tokenizer(source: str | Path, chat_template: str = "") -> Any:
    """The tokenizer of a directory (or hub id), with config.data.chat_template's template in
    place of its own where one is given. Never runs code from the model repo."""
    import transformers

    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    except Exception as e:
        raise DataError(
            f"{source}: no tokenizer could be loaded ({type(e).__name__}: {str(e)[:200]}). Point "
            "config.data.tokenizer (or --model) at a directory with tokenizer files."
        ) from e
    if chat_template:
        tokenizer.chat_template = resolve_chat_template(chat_template)
    return tokenizer


def _render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
    except Exception as e:  # jinja raise_exception(...) or a template bug: say which example
        raise BadExample(f"the chat template failed: {e}", "template_error") from e


def render_with_spans(
    tokenizer: Any, conversation: Conversation, train_on: str
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the [start, end) character spans to train."""
    if not tokenizer.chat_template:
        raise TemplateError(
            f"tokenizer {tokenizer.name_or_path!r} has no chat template, so conversations cannot "
            "be rendered. Set config.data.chat_template ('chatml', a .jinja file or the "
            "template text), or use a tokenizer that has one."
        )
    messages = list(conversation.messages)
    full = _render(tokenizer, messages, generation_prompt=False)
    if train_on == "all_tokens":
        return full, [(0, len(full))]
    turns = [
        i
        for i, m in enumerate(messages)
        if m["role"] == "assistant" and i >= conversation.trained_from
    ]
    if not turns:
        raise BadExample("the conversation has no assistant message to train on", "no_assistant")
    if train_on == "last_assistant":
        turns = turns[-1:]
    return full, [_reply_span(tokenizer, messages, i, full) for i in turns]


def _reply_span(tokenizer: Any, messages: list[dict], index: int, full: str) -> tuple[int, int]:
    before = _render(tokenizer, messages[:index], generation_prompt=True)
    through = _render(tokenizer, messages[: index + 1], generation_prompt=False)
    if not (through.startswith(before) and full.startswith(through)):
        raise TemplateError(
            f"the chat template does not render assistant message {index} as an extension of "
            "the conversation before it (prefix renders differ), so its trained span cannot be "
            "verified. Set config.data.chat_template to a template that renders turns in "
            "order (e.g. 'chatml'), or config.data.train_on='all_tokens'."
        )
    reply = through[len(before) :].rstrip()
    content = messages[index]["content"].strip()
    if content not in reply:
        raise TemplateError(
            f"assistant message {index}: its content does not appear in its rendered span "
            f"{reply[:80]!r}; the chat template rewrites replies, so the trained span cannot "
            "be verified. Use another config.data.chat_template."
        )
    return len(before), len(before) + len(reply)


def completion_text(
    tokenizer: Any, prompt: str, completion: str
) -> tuple[str, list[tuple[int, int]]]:
    """Plain text `BOS? prompt completion EOS`, the completion and EOS trained."""
    if tokenizer.eos_token is None:
        raise TemplateError(
            "the tokenizer has no eos_token, so plain-text examples cannot end in one; set "
            "eos_token in the tokenizer's tokenizer_config.json."
        )
    start = adds_bos_text(tokenizer) + prompt
    text = start + completion + tokenizer.eos_token
    return text, [(len(start), len(text))]


def adds_bos_text(tokenizer: Any) -> str:
    """BOS as text when the tokenizer puts one in front of plain text, else ''."""
    bos_id = tokenizer.bos_token_id
    if bos_id is None:
        return ""
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    return tokenizer.bos_token if with_special and with_special[0] == bos_id else ""
