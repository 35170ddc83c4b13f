"""Builds the offline tool-use demo: calculator conversations, a tokenizer and a random tiny Llama.

Run (deterministic from --seed; rewrites every file under --out):
  python scripts/make_tools_demo.py --out=assets

Writes
  OUT/tools_demo_data/train.jsonl   user asks, assistant calls the calculator, the tool answers,
                                    the assistant replies with the result
  OUT/tools_demo_data/eval.jsonl    the same conversations cut after the call: the reply eval
                                    generates and scores by exact match is the tool-call JSON
  OUT/tools_demo_model/             config.json, model.safetensors, tokenizer with TEMPLATE

  {"tools": [calculator schema], "messages": [
     {"role": "user", "content": "What is 37 times 12?"},
     {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "id": "call_0",
      "function": {"name": "calculator", "arguments": {"expression": "37 * 12"}}}]},
     {"role": "tool", "content": "444", "tool_call_id": "call_0"},
     {"role": "assistant", "content": "444"}]}

No eval question (operation and operands) appears in train. The model (the demo's shape)
must learn to write the call with the operands copied from the question, and to answer with
the number the tool returned.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from absl import app, flags
from make_demo_assets import save_model, train_tokenizer, write_jsonl

# The flags (--out, --seed, --train_size, --eval_size, --vocab_size, the model's shape) are
# make_demo_assets.py's, with its defaults.
FLAGS = flags.FLAGS

# A ChatML template with tool calls, written for this demo: a call is
# <tool_call>{"name": ..., "arguments": {...}}</tool_call> inside the assistant turn, a result a
# "tool" turn; the tools are listed by name in a system turn.
TEMPLATE = (
    "{%- if tools %}{{- '<|im_start|>system\\nTools: ' + (tools | map(attribute='function.name')"
    " | join(', ')) + '<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' and message.tool_calls %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- for call in message.tool_calls %}"
    "{{- '<tool_call>' + {'name': call.function.name, 'arguments': call.function.arguments}"
    " | tojson + '</tool_call>' }}"
    "{%- endfor %}{{- '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
TOOLS = [{"type": "function", "function": {
    "name": "calculator", "description": "Evaluate an arithmetic expression.",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}},
                   "required": ["expression"]}}}]  # fmt: skip
OPERATIONS = {"plus": ("+", lambda a, b: a + b), "minus": ("-", lambda a, b: a - b),
              "times": ("*", lambda a, b: a * b)}  # fmt: skip
PHRASINGS = ("What is {a} {op} {b}?", "Compute {a} {op} {b}.", "Use the calculator: {a} {op} {b}")


def question(rng: random.Random) -> tuple[tuple, str, str, str]:
    """(key, question, expression, result) of one calculator task."""
    op = rng.choice(sorted(OPERATIONS))
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    symbol, function = OPERATIONS[op]
    return (
        (op, a, b),
        rng.choice(PHRASINGS).format(a=a, op=op, b=b),
        f"{a} {symbol} {b}",
        str(function(a, b)),
    )


def conversation(number: int, question_parts: tuple) -> dict:
    _, asked, expression, result = question_parts
    call_id = f"call_{number}"
    arguments = {"expression": expression}
    call = {"type": "function", "id": call_id,
            "function": {"name": "calculator", "arguments": arguments}}  # fmt: skip
    return {"tools": TOOLS, "messages": [
        {"role": "user", "content": asked},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": result, "tool_call_id": call_id},
        {"role": "assistant", "content": result},
    ]}  # fmt: skip


def make_splits(seed: int, train_size: int, eval_size: int) -> tuple[list, list]:
    rng = random.Random(seed)
    eval_set, taken = [], set()
    while len(eval_set) < eval_size:
        parts = question(rng)
        if parts[0] not in taken:
            taken.add(parts[0])
            full = conversation(len(eval_set), parts)
            eval_set.append({**full, "messages": full["messages"][:2]})  # cut after the call
    train_set = []
    while len(train_set) < train_size:
        parts = question(rng)
        if parts[0] not in taken:
            train_set.append(conversation(len(train_set), parts))
    return train_set, eval_set


def corpus(examples: list[dict]) -> list[dict]:
    """Message texts for the tokenizer, the calls as the template writes them."""
    texts = []
    for example in examples:
        for message in example["messages"]:
            for call in message.get("tool_calls", ()):
                function = call["function"]
                text = json.dumps({"name": function["name"], "arguments": function["arguments"]})
                texts.append({"role": "assistant", "content": f"<tool_call>{text}</tool_call>"})
            texts.append({"role": message["role"], "content": message["content"]})
    texts.append({"role": "system", "content": "Tools: calculator"})
    return [{"messages": texts}]


def main(argv: list[str]) -> None:
    del argv
    out = Path(FLAGS.out)
    train_set, eval_set = make_splits(FLAGS.seed, FLAGS.train_size, FLAGS.eval_size)
    write_jsonl(out / "tools_demo_data" / "train.jsonl", train_set)
    write_jsonl(out / "tools_demo_data" / "eval.jsonl", eval_set)
    tokenizer = train_tokenizer(corpus(train_set), FLAGS.vocab_size)
    tokenizer.chat_template = TEMPLATE
    save_model(out / "tools_demo_model", tokenizer, FLAGS.seed)
    print(f"wrote {len(train_set)} train and {len(eval_set)} eval conversations, a "
          f"{len(tokenizer)}-token tokenizer and a model to {out}")  # fmt: skip


if __name__ == "__main__":
    app.run(main)
