"""Step-0 eval loss on reasoning and tool conversations against transformers + PyTorch.

The reference takes nothing from sft_jax's data layer: for each trained assistant turn i it
renders messages[:i + 1] with a copy of the model's real template that has `{% generation %}`
markers, takes transformers' `return_assistant_tokens_mask` for that last turn, and computes
the masked mean cross-entropy with the transformers model. sft_jax's eval loss, packed and
unpacked, must equal it (rel 1e-4): for Qwen3 (reasoning, history rewriting) and for Llama 3.1
on calling turns with text, which its template renders as the call alone (trained as rendered,
as TRL trains them).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers
from hf_models import hf_logits, save_tiny_llama
from test_chat_templates import TEXT_AND_CALL, THINK_CHAT, TOOL_CHAT, build
from test_trainer import base_config

from sft_jax.core.spec import RunSpec
from sft_jax.data import open_data
from sft_jax.data.formats import normalize
from sft_jax.loop import trainer
from sft_jax.models import from_pretrained

QWEN3 = "Qwen-Qwen3-0.6B"
LLAMA3_1 = "meta-llama-Llama-3.1-8B-Instruct"


def qwen3_generation_markers(template: str) -> str:
    """Qwen3's template with markers around each assistant reply: after the header, through
    <|im_end|> (the newline after it is template glue)."""
    think = "'\\n<think>\\n' + reasoning_content"
    plain = "{{- '<|im_start|>' + message.role + '\\n' + content }}"
    header = "{{- '<|im_start|>' + message.role + '\\n' }}"
    replaced = template.replace(
        "{{- '<|im_start|>' + message.role + " + think,
        header + "{% generation %}{{- '<think>\\n' + reasoning_content",
    )
    replaced = replaced.replace(
        "content.lstrip('\\n') }}", "content.lstrip('\\n') }}{% endgeneration %}"
    )
    replaced = replaced.replace(plain, header + "{% generation %}{{- content }}{% endgeneration %}")
    start = replaced.index("{%- if message.tool_calls %}")
    end = replaced.index("{{- '<|im_end|>\\n' }}", start)
    replaced = (replaced[:start] + "{% generation %}" + replaced[start:end]
                + "{{- '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}"
                + replaced[end + len("{{- '<|im_end|>\\n' }}"):])  # fmt: skip
    assert replaced.count("{% generation %}") == 4
    return replaced


def llama3_1_generation_markers(template: str) -> str:
    """Llama 3.1's template with markers around each assistant reply: its text through
    <|eot_id|>, and a call's JSON then its <|eot_id|> (two blocks: markers nest in if/else)."""
    plain = (
        "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ "
        "message['content'] | trim + '<|eot_id|>' }}"
    )
    marked_plain = (
        "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
        "{%- if message.role == 'assistant' %}{% generation %}"
        "{{- message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
        "{%- else %}{{- message['content'] | trim + '<|eot_id|>' }}{%- endif %}"
    )
    call = "{{- '{\"name\": \"' + tool_call.name + '\", ' }}"
    call_end = '{{- "}" }}'
    end = "{%- if builtin_tools is defined %}\n            {#- This means"
    end_close = '{{- "<|eot_id|>" }}\n        {%- endif %}'
    replaced = template
    for old, new in ((plain, marked_plain), (call, "{% generation %}" + call),
                     (call_end, call_end + "{% endgeneration %}"), (end, "{% generation %}" + end),
                     (end_close, end_close + "{% endgeneration %}")):  # fmt: skip
        assert replaced.count(old) == 1, old
        replaced = replaced.replace(old, new)
    return replaced


def examples() -> list[dict]:
    """Reasoning and tool conversations with varied numbers."""
    out = []
    for k in range(3):
        think = json.loads(json.dumps(THINK_CHAT).replace("2 + 2", f"{k} + 2"))
        out += [think, with_numbers(TOOL_CHAT, k)]
    return out


def llama_examples() -> list[dict]:
    """Tool conversations whose calling turns have text (Llama 3.1 renders the call alone)
    and ones whose calling turns have none, with varied numbers."""
    return [with_numbers(chat, k) for k in range(3) for chat in (TEXT_AND_CALL, TOOL_CHAT)]


def with_numbers(chat: dict, k: int) -> dict:
    return json.loads(json.dumps(chat).replace('"a\\": 3', f'"a\\": {k + 3}'))


# name -> (real template, its copy with generation markers, the conversations)
CASES = {
    "qwen3": (QWEN3, qwen3_generation_markers, examples),
    "llama3_1_text_and_calls": (LLAMA3_1, llama3_1_generation_markers, llama_examples),
}


def reference_loss(model_dir, tokenizer, rows: list[dict], markers) -> tuple[float, int]:
    """Masked mean cross-entropy of every trained turn, as transformers renders and scores it."""
    marked = transformers.AutoTokenizer.from_pretrained(model_dir)
    marked.chat_template = markers(tokenizer.chat_template)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, attn_implementation="eager"
    ).eval()
    nll, count = 0.0, 0
    for row in rows:
        conversation = normalize(row, "messages")
        messages = list(conversation.messages)
        for i in [i for i, m in enumerate(messages) if m["role"] == "assistant"]:
            out = marked.apply_chat_template(
                messages[: i + 1], tools=list(conversation.tools or []) or None, tokenize=True,
                return_dict=True, return_assistant_tokens_mask=True,
            )  # fmt: skip
            ids, mask = np.asarray(out["input_ids"]), np.asarray(out["assistant_masks"], bool)
            starts = np.flatnonzero(mask & ~np.concatenate([[False], mask[:-1]]))
            mask[: starts[-1]] = False  # this turn only: earlier turns have their own document
            logits = torch.as_tensor(hf_logits(model, ids[None])[0], dtype=torch.float64)
            log_probs = torch.log_softmax(logits, dim=-1).numpy()
            targets = np.flatnonzero(mask)
            nll -= log_probs[targets - 1, ids[targets]].sum()
            count += len(targets)
    return nll / count, count


@pytest.mark.parametrize("case", sorted(CASES))
def test_step_zero_eval_loss_equals_transformers_packed_and_unpacked(case, tmp_path):
    template, markers, conversations = CASES[case]
    rows, model_dir = conversations(), tmp_path / "model"
    tokenizer = build(template, rows)
    save_tiny_llama(model_dir, tokenizer)
    for name in ("train", "eval"):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    expected, targets = reference_loss(model_dir, tokenizer, rows, markers)
    losses = {}
    for packing in (True, False):
        config = base_config(model_dir)
        config.data.train_files = str(tmp_path / "train.jsonl")
        config.data.eval_files = str(tmp_path / "eval.jsonl")
        config.data.max_length = 1024 if packing else 512
        config.data.packing = packing
        config.data.cache_dir = "none"
        source = open_data(RunSpec.of(config))
        run = trainer.Trainer(
            RunSpec.of(config), tmp_path / str(packing), from_pretrained(model_dir), source
        )
        losses[packing] = run.run_eval(0)
    for metrics in losses.values():
        assert metrics["eval/target_tokens"] == targets
        assert metrics["eval/loss"] == pytest.approx(expected, rel=1e-4)
