"""Chat templates: which one renders a conversation, and rendering it as transformers does.

The spans a rendering trains are found in `sft_jax.data.spans`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from sft_jax.data.messages import BadExample
from sft_jax.data.records import DataError

log = logging.getLogger(__name__)

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


def render(
    tokenizer: Any,
    messages: list[dict],
    generation_prompt: bool,
    tools: list[dict] | None = None,
    kwargs: dict | None = None,
) -> str:
    """The template's text for `messages`, as apply_chat_template(messages, tools=..., **kwargs)."""
    if not tokenizer.chat_template:
        raise TemplateError(
            f"tokenizer {tokenizer.name_or_path!r} has no chat template, so conversations cannot "
            "be rendered. Set config.data.chat_template ('chatml', a .jinja file or the "
            "template text), or use a tokenizer that has one."
        )
    try:
        return tokenizer.apply_chat_template(
            messages,
            tools=tools,
            tokenize=False,
            add_generation_prompt=generation_prompt,
            **(kwargs or {}),
        )
    except Exception as e:  # jinja raise_exception(...) or a template bug: say which example
        raise BadExample(f"the chat template failed: {e}", "template_error") from e


_warned_templates: set[int] = set()


def special_texts(tokenizer: Any) -> list[str]:
    """The texts of the special and added tokens (<|im_end|>, <|eot_id|>, ...), longest first."""
    added = [t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values()]
    texts = {t for t in [*tokenizer.all_special_tokens, *added] if t}
    return sorted(texts, key=len, reverse=True)


def warn_without_end_of_turn(tokenizer: Any, reply: str) -> None:
    """Once per template: a reply that ends in no special token trains no terminator, so the
    model would not learn to stop."""
    specials = special_texts(tokenizer)
    key = hash(tokenizer.chat_template)
    if key in _warned_templates or any(reply.endswith(t) for t in specials):
        return
    _warned_templates.add(key)
    log.warning(
        "the chat template of %r ends an assistant reply with %r, not an end-of-turn token "
        "(none of %s): no terminator is trained, so the model may not learn to stop. Use a "
        "config.data.chat_template that closes replies with one.",
        tokenizer.name_or_path,
        reply[-20:],
        ", ".join(specials[:6]),
    )


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
