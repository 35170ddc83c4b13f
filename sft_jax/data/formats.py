"""Dataset formats, detected from the columns, normalized to conversations or plain completions.

messages           {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", ...}]}
                   (+ reasoning, tool calls, tool results, "tools": see sft_jax.data.messages)
sharegpt           {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", ...}]}
                   (+ "function_call" / "observation" turns and a "tools" field)
prompt_completion  {"prompt": "2+2=", "completion": "4"}  (strings, or lists of messages)
alpaca             {"instruction": "Add", "input": "2 and 2", "output": "4"}
text               {"text": "Every token of this is trained."}
"""

from __future__ import annotations

import dataclasses
from typing import Any

from sft_jax.data import messages as chat
from sft_jax.data.messages import ROLES, BadExample

# Llama 3.1 datasets name tool results by the role the template renders them under.
MESSAGE_ROLES = {r: r for r in ROLES} | {"ipython": "tool"}
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "observation": "tool"} | {
    r: r for r in (*ROLES, "function_call")
}
# Format -> the columns that identify it, in detection order.
FORMAT_COLUMNS: dict[str, tuple[str, ...]] = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
    "text": ("text",),
}
FORMATS = tuple(FORMAT_COLUMNS)


@dataclasses.dataclass(frozen=True)
class Conversation:
    """Messages rendered with the chat template; assistant turns from `trained_from` on learn.

    `tools` (function schemas) and `template_kwargs` go to the template with the messages.
    """

    messages: tuple[dict[str, Any], ...]
    trained_from: int = 0
    tools: tuple[dict, ...] | None = None
    template_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)


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
    tools = chat.tool_schemas(value.get("tools"))
    kwargs = chat.template_kwargs(value.get("chat_template_kwargs"))
    if data_format == "messages":
        turns = _messages(value["messages"], "messages", "role", "content", MESSAGE_ROLES)
        return Conversation(turns, tools=tools, template_kwargs=kwargs)
    if data_format == "sharegpt":
        turns = _messages(value["conversations"], "conversations", "from", "value", SHAREGPT_ROLES)
        return Conversation(turns, tools=tools, template_kwargs=kwargs)
    if data_format == "prompt_completion":
        example = _prompt_completion(value["prompt"], value["completion"])
        if isinstance(example, Conversation):
            example = dataclasses.replace(example, tools=tools, template_kwargs=kwargs)
        return example
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


def _messages(
    turns: Any, field: str, role_key: str, content_key: str, roles: Any
) -> tuple[dict[str, Any], ...]:
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
        calls_only = isinstance(turn, dict) and turn.get("tool_calls") and role_key in turn
        if (
            not isinstance(turn, dict)
            or role_key not in turn
            or not (content_key in turn or calls_only)
        ):
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
        role = roles[role] if isinstance(roles, dict) else role
        if content_key == "value":
            messages.append(chat.sharegpt_turn(turn, role, turn[content_key], where))
        else:
            messages.append(
                chat.chat_message(turn, role, turn.get(content_key), where, content_key)
            )
    chat.check_tool_results(messages, field)
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
