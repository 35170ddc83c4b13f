"""Dataset formats, detected from the columns, normalized to conversations or plain completions.

messages           {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", ...}]}
sharegpt           {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", ...}]}
prompt_completion  {"prompt": "2+2=", "completion": "4"}  (strings, or lists of messages)
alpaca             {"instruction": "Add", "input": "2 and 2", "output": "4"}
text               {"text": "Every token of this is trained."}
"""

from __future__ import annotations

import dataclasses
from typing import Any

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"} | {r: r for r in ROLES}
# Format -> the columns that identify it, in detection order.
FORMAT_COLUMNS: dict[str, tuple[str, ...]] = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
    "text": ("text",),
}
FORMATS = tuple(FORMAT_COLUMNS)


class BadExample(ValueError):
    """One example is malformed; `reason` is the short name it is counted under when skipped."""

    def __init__(self, problem: str, reason: str):
        super().__init__(problem)
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class Conversation:
    """Messages rendered with the chat template; assistant turns from `trained_from` on learn."""

    messages: tuple[dict[str, str], ...]
    trained_from: int = 0


@dataclasses.dataclass(frozen=True)
class Completion:
    """Plain text: `prompt` is context only, `completion` (then EOS) is trained."""

    prompt: str
    completion: str


def detect_format(value: Any) -> str | None:
    """The format whose columns `value` has, or None."""
    if not isinstance(value, dict):
        return None
    for name, columns in FORMAT_COLUMNS.items():
        if all(column in value for column in columns):
            return name
    return None


def describe_formats() -> str:
    return "; ".join(f"{name}: {', '.join(cols)}" for name, cols in FORMAT_COLUMNS.items())


def normalize(value: Any, data_format: str) -> Conversation | Completion:
    """One raw example in `data_format` -> Conversation or Completion, or BadExample."""
    if not isinstance(value, dict):
        raise BadExample(
            f"expected an object with fields, got {type(value).__name__}", "not_object"
        )
    missing = [c for c in FORMAT_COLUMNS[data_format] if c not in value]
    if missing:
        raise BadExample(
            f"missing field {missing[0]!r} of the {data_format} format (fields present: "
            f"{', '.join(sorted(value)) or 'none'})",
            "missing_field",
        )
    if data_format == "messages":
        return Conversation(_messages(value["messages"], "messages", "role", "content", ROLES))
    if data_format == "sharegpt":
        turns = _messages(value["conversations"], "conversations", "from", "value", SHAREGPT_ROLES)
        return Conversation(turns)
    if data_format == "prompt_completion":
        return _prompt_completion(value["prompt"], value["completion"])
    if data_format == "alpaca":
        instruction = _string(value["instruction"], "instruction")
        extra = _string(value.get("input") or "", "input")
        user = f"{instruction}\n\n{extra}" if extra else instruction
        reply = _string(value["output"], "output")
        return Conversation(
            ({"role": "user", "content": user}, {"role": "assistant", "content": reply})
        )
    return Completion("", _string(value["text"], "text"))


def _string(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise BadExample(
            f"field {field!r} must be a string, got {type(value).__name__}", "mistyped_field"
        )
    return value


def _content(value: Any, field: str) -> str:
    """Message content: a string, or a list of {"type": "text", "text": ...} parts."""
    if isinstance(value, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        for p in value
    ):
        return "".join(p["text"] for p in value)
    return _string(value, field)


def _messages(
    turns: Any, field: str, role_key: str, content_key: str, roles: Any
) -> tuple[dict[str, str], ...]:
    if not isinstance(turns, list):
        raise BadExample(
            f"field {field!r} must be a list of messages, got {type(turns).__name__}",
            "mistyped_field",
        )
    if not turns:
        raise BadExample(f"field {field!r} is an empty conversation", "empty_conversation")
    messages = []
    for index, turn in enumerate(turns):
        where = f"{field}[{index}]"
        if not isinstance(turn, dict) or role_key not in turn or content_key not in turn:
            raise BadExample(
                f"{where} must be an object with {role_key!r} and {content_key!r}, "
                f"got {turn!r:.80}",
                "mistyped_field",
            )
        role = turn[role_key]
        if role not in roles:
            raise BadExample(
                f"{where} has unknown role {role!r}; expected one of {', '.join(roles)}",
                "unknown_role",
            )
        content = _content(turn[content_key], f"{where}.{content_key}")
        messages.append(
            {"role": roles[role] if isinstance(roles, dict) else role, "content": content}
        )
    return tuple(messages)


def _prompt_completion(prompt: Any, completion: Any) -> Conversation | Completion:
    if isinstance(prompt, str) and isinstance(completion, str):
        return Completion(prompt, completion)
    if isinstance(prompt, list) and isinstance(completion, list):
        before = _messages(prompt, "prompt", "role", "content", ROLES) if prompt else ()
        after = _messages(completion, "completion", "role", "content", ROLES)
        return Conversation(before + after, trained_from=len(before))
    raise BadExample(
        "fields 'prompt' and 'completion' must both be strings or both be lists of messages, "
        f"got {type(prompt).__name__} and {type(completion).__name__}",
        "mistyped_field",
    )
