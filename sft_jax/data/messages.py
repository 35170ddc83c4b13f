"""Chat messages with reasoning and tool calls, normalized to what chat templates take.

One message, as `transformers`' `apply_chat_template` and the stock templates expect it:

  {"role": "assistant", "content": "It is 4.", "reasoning_content": "2 + 2 = 4",
   "tool_calls": [{"type": "function", "id": "call_1",
                   "function": {"name": "add", "arguments": {"a": 2, "b": 2}}}]}
  {"role": "tool", "content": "4", "tool_call_id": "call_1", "name": "add"}

Read from data: `content` as a string, a list of text parts or absent (an assistant turn that
only calls tools); reasoning as `reasoning_content`, `reasoning` or `thinking` (given to the
template as `reasoning_content`), or inline as a leading `<think>…</think>` in assistant
content (left there for the template); tool-call `arguments` as an object or a JSON
string (templates get the object); `tools` as a list of function schemas (or its JSON text).
Keys a message does not have are left out: templates test `'tool_calls' in message`.
"""

from __future__ import annotations

import json
from typing import Any

ROLES = ("system", "user", "assistant", "tool")
REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
# Records read to tell whether a data file holds images (data/images.any_has_images): such files
# often open with text-only conversations (those train beside the others, without images).
SCAN_RECORDS = 256


class BadExample(ValueError):
    """One example is malformed; `reason` is the short name it is counted under when skipped."""

    def __init__(self, problem: str, reason: str):
        super().__init__(problem)
        self.reason = reason


def text_content(value: Any, field: str) -> str:
    """Message content: a string, or a list of {"type": "text", "text": ...} parts."""
    if isinstance(value, list) and any(_is_image_part(p) for p in value):
        raise BadExample(
            f"field {field!r} holds an image; examples with images are prepared by the vision "
            "model's processor (sft_jax.data.vision), which text-only training does not read "
            f"(SFT reads a file with images when one of its first {SCAN_RECORDS} examples holds "
            "one; other objectives and mixtures take text only)",
            "image_in_text_data",
        )
    if isinstance(value, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        for p in value
    ):
        return "".join(p["text"] for p in value)
    if not isinstance(value, str):
        raise BadExample(
            f"field {field!r} must be a string, got {type(value).__name__}", "mistyped_field"
        )
    return value


def chat_message(turn: dict, role: str, content: Any, where: str, content_key: str) -> dict:
    """One message of a conversation with its reasoning, tool calls and tool-result ids."""
    reasoning_keys = [k for k in REASONING_KEYS if turn.get(k) not in (None, "")]
    if reasoning_keys and role != "assistant":
        raise BadExample(
            f"{where}.{reasoning_keys[0]}: only assistant messages carry reasoning, this one "
            f"has role {role!r}",
            "misplaced_reasoning",
        )
    calls = turn.get("tool_calls")
    if calls not in (None, []) and role != "assistant":
        raise BadExample(
            f"{where}.tool_calls: only assistant messages call tools, this one has role {role!r}",
            "misplaced_tool_calls",
        )
    if content is None and (role == "assistant" and calls):
        content = ""
    if role == "tool" and isinstance(content, (dict, list)) and not _is_text_parts(content):
        content = json.dumps(content, ensure_ascii=False)  # a structured tool result
    message = {"role": role, "content": text_content(content, f"{where}.{content_key}")}
    if reasoning_keys:
        key = reasoning_keys[0]
        message["reasoning_content"] = text_content(turn[key], f"{where}.{key}")
    if calls not in (None, []):
        message["tool_calls"] = tool_calls(calls, f"{where}.tool_calls")
    for key in ("tool_call_id", "name"):
        if role == "tool" and turn.get(key) is not None:
            message[key] = _string(turn[key], f"{where}.{key}")
    return message


def _is_image_part(part: Any) -> bool:
    return isinstance(part, dict) and part.get("type") in ("image", "image_url")


def _is_text_parts(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(p, dict) and p.get("type") == "text" for p in value
    )


def _string(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise BadExample(
            f"field {field!r} must be a string, got {type(value).__name__}", "mistyped_field"
        )
    return value


def reasoning_and_answer(message: dict) -> tuple[str, str]:
    """An assistant message's reasoning and answer: its reasoning_content and content, or a
    leading `<think>R</think>A` of its content split as Qwen3's template splits it. Inline
    reasoning stays in the content the template gets: the template decides how to render it."""
    content = message["content"]
    if "reasoning_content" in message:
        return message["reasoning_content"], content
    stripped = content.lstrip()
    if stripped.startswith(THINK_OPEN) and THINK_CLOSE in stripped:
        reasoning, _, answer = stripped.partition(THINK_CLOSE)
        return reasoning[len(THINK_OPEN) :].strip("\n"), answer.lstrip("\n")
    return "", content


def tool_calls(value: Any, field: str) -> list[dict]:
    """OpenAI-form tool calls; `arguments` given as a JSON string become the object."""
    value = _list(
        [value] if isinstance(value, dict) else value, field, "tool calls", "mistyped_field"
    )
    calls = []
    for index, call in enumerate(value):
        where = f"{field}[{index}]"
        function = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise BadExample(
                f"{where} must be {{'type': 'function', 'function': {{'name': ..., "
                f"'arguments': ...}}}}, got {call!r:.80}",
                "bad_tool_call",
            )
        arguments = parse_arguments(function.get("arguments", {}), f"{where}.function.arguments")
        out = {"type": "function", "function": {"name": function["name"], "arguments": arguments}}
        if isinstance(call.get("id"), str):
            out["id"] = call["id"]
        calls.append(out)
    return calls


def _list(value: Any, field: str, what: str, reason: str) -> list:
    if not isinstance(value, list):
        raise BadExample(
            f"field {field!r} must be a list of {what}, got {type(value).__name__}", reason
        )
    return value


def _json(text: str, field: str, reason: str) -> Any:
    """JSON text found in a field; invalid JSON is a BadExample counted under `reason`."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise BadExample(
            f"{field} is not valid JSON ({e.msg} at column {e.colno}): {text!r:.80}", reason
        ) from None


def parse_arguments(value: Any, field: str) -> dict:
    if isinstance(value, str):
        value = _json(value, field, "invalid_tool_arguments")
    if not isinstance(value, dict):
        raise BadExample(
            f"{field} must be a JSON object of argument names and values, got "
            f"{type(value).__name__}",
            "invalid_tool_arguments",
        )
    return value


def check_tool_results(messages: list[dict], field: str) -> None:
    """Every tool message answers a tool call made before it (by id when both have ids)."""
    made: list[dict] = []
    for index, message in enumerate(messages):
        made.extend(message.get("tool_calls", ()))
        if message["role"] != "tool":
            continue
        if not made:
            raise BadExample(
                f"{field}[{index}] is a tool result with no tool call before it",
                "orphan_tool_result",
            )
        ids = {call["id"] for call in made if "id" in call}
        call_id = message.get("tool_call_id")
        if call_id is not None and ids and call_id not in ids:
            raise BadExample(
                f"{field}[{index}].tool_call_id {call_id!r} answers no earlier tool call "
                f"(ids: {', '.join(sorted(ids))})",
                "orphan_tool_result",
            )


def tool_schemas(value: Any, field: str = "tools") -> tuple[dict, ...] | None:
    """The example's function list: [{"type": "function", "function": {"name", ...}}] (bare
    {"name", "parameters"} entries are wrapped), or None when it has none."""
    if value in (None, "", []):
        return None
    if isinstance(value, str):
        value = _json(value, f"field {field!r}", "bad_tool_schema")
    value = _list(value, field, "function schemas", "bad_tool_schema")
    schemas = []
    for index, tool in enumerate(value):
        function = tool.get("function", tool) if isinstance(tool, dict) else None
        valid = (
            isinstance(function, dict)
            and isinstance(function.get("name"), str)
            and isinstance(function.get("parameters", {}), dict)
        )
        if not valid:
            raise BadExample(
                f"{field}[{index}] is not a function schema ({{'type': 'function', 'function': "
                f"{{'name': str, 'description': str, 'parameters': {{JSON schema}}}}}}): "
                f"{tool!r:.80}",
                "bad_tool_schema",
            )
        schemas.append({"type": "function", "function": function})
    return tuple(schemas)


def template_kwargs(value: Any, field: str = "chat_template_kwargs") -> dict:
    """Per-example keyword arguments of the chat template (e.g. {"enable_thinking": false})."""
    if value in (None, ""):
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            value = None
    if not isinstance(value, dict):
        raise BadExample(f"field {field!r} must be a JSON object", "mistyped_field")
    return value


def sharegpt_turn(turn: dict, role: str, value: Any, where: str) -> dict:
    """ShareGPT's `function_call` (the call as JSON) and `observation` (its result) turns."""
    if role == "function_call":
        calls = (
            _json(value, f"{where}.value", "invalid_tool_arguments")
            if isinstance(value, str)
            else value
        )
        calls = calls if isinstance(calls, list) else [calls]
        wrapped = [{"type": "function", "function": c} if isinstance(c, dict) else c for c in calls]
        return chat_message({"tool_calls": wrapped}, "assistant", "", where, "value")
    return chat_message(turn, role, value, where, "value")
