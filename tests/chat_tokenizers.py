"""Tokenizers built locally in the styles of real chat models (no download), for data tests.

Each has the special tokens and a chat template that renders the same text format as the
model family's own (written for these tests): ChatML (Qwen2.5), Llama 3, Mistral, Gemma.
Words, punctuation and whitespace runs are single tokens, so expectations stay readable.
"""

from __future__ import annotations

import re

import tokenizers
import transformers

_PIECES = r"\s+|\w+|[^\w\s]"

CHATML = (
    "{% if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] | trim }}"
    "{{ '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}"
)
MISTRAL = (
    "{{ bos_token }}{% set ns = namespace(system='') %}"
    "{% for m in messages %}{% if m['role'] == 'system' %}{% set ns.system = m['content'] %}"
    "{% elif m['role'] == 'user' %}"
    "{{ '[INST] ' + (ns.system + '\\n\\n' if ns.system else '') + m['content'] + ' [/INST]' }}"
    "{% set ns.system = '' %}"
    "{% else %}{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}"
)
GEMMA = (
    "{{ bos_token }}{% set ns = namespace(system='') %}"
    "{% for m in messages %}{% if m['role'] == 'system' %}{% set ns.system = m['content'] %}"
    "{% else %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' + (ns.system + '\\n\\n' if ns.system else '') }}"
    "{{ m['content'] | trim + '<end_of_turn>\\n' }}{% set ns.system = '' %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)

# style -> (special tokens, bos, eos, template)
STYLES = {
    "chatml": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|im_end|>", CHATML),
    "llama3": (
        ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
         "<|eot_id|>"],
        "<|begin_of_text|>", "<|eot_id|>", LLAMA3,
    ),
    "mistral": (["<s>", "</s>", "[INST]", "[/INST]"], "<s>", "</s>", MISTRAL),
    "gemma": (
        ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>", GEMMA,
    ),
}  # fmt: skip

WORDS = (
    "You are a helpful assistant . Be brief Hi Hello ! How are you ? Fine thanks What is + "
    "Add and Sort these letters a b c d Reverse cat tac system user assistant model "
    "Answer with one word Yes No okay " + " ".join(str(n) for n in range(1000))
)


def word_level(vocabulary: list[str], specials: list[str]) -> tokenizers.Tokenizer:
    """A WordLevel tokenizer over these pieces (split as _PIECES splits text) and specials."""
    vocab = {"<unk>": 0, "<pad>": 1}
    for piece in vocabulary:
        vocab.setdefault(piece, len(vocab))
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Split(
        tokenizers.Regex(_PIECES), behavior="isolated"
    )
    backend.decoder = tokenizers.decoders.Fuse()
    backend.add_special_tokens(specials)
    return backend


def pieces(text: str) -> list[str]:
    return re.findall(_PIECES, text)


def make_tokenizer(
    style: str, corpus: str = WORDS, add_bos: bool = True, template: bool = True
) -> transformers.PreTrainedTokenizerBase:
    """A WordLevel tokenizer over the pieces of `corpus` with `style`'s specials and template.

    With add_bos (and a BOS in the style) the tokenizer puts BOS in front of plain text, as
    Llama's and Gemma's do, which the chat path must not double.
    """
    specials, bos, eos, chat_template = STYLES[style]
    backend = word_level([*pieces(corpus), " ", "\n", "\n\n", "  "], specials)
    if bos and add_bos:
        backend.post_processor = tokenizers.processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, backend.token_to_id(bos))]
        )
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=bos, eos_token=eos, pad_token="<pad>",
        unk_token="<unk>", additional_special_tokens=[s for s in specials if s not in (bos, eos)],
    )  # fmt: skip
    tokenizer.chat_template = chat_template if template else None
    return tokenizer


# Real chat templates (tests/data/templates, see SOURCES.md there): file -> (special tokens,
# bos, eos). The special tokens are those each model's tokenizer has as single tokens.
QWEN_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
]
LLAMA3_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|python_tag|>",
]
MISTRAL_SPECIALS = [
    "<s>",
    "</s>",
    "[INST]",
    "[/INST]",
    "[TOOL_CALLS]",
    "[AVAILABLE_TOOLS]",
    "[/AVAILABLE_TOOLS]",
    "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]",
]
DEEPSEEK_SPECIALS = [
    "<｜begin▁of▁sentence｜>",
    "<｜end▁of▁sentence｜>",
    "<｜User｜>",
    "<｜Assistant｜>",
    "<think>",
    "</think>",
    "<｜tool▁calls▁begin｜>",
    "<｜tool▁calls▁end｜>",
    "<｜tool▁call▁begin｜>",
    "<｜tool▁call▁end｜>",
    "<｜tool▁sep｜>",
    "<｜tool▁outputs▁begin｜>",
    "<｜tool▁outputs▁end｜>",
    "<｜tool▁output▁begin｜>",
    "<｜tool▁output▁end｜>",
]
GPT_OSS_SPECIALS = [
    "<|startoftext|>",
    "<|endoftext|>",
    "<|start|>",
    "<|end|>",
    "<|message|>",
    "<|channel|>",
    "<|constrain|>",
    "<|return|>",
    "<|call|>",
]
GEMMA4_SPECIALS = [
    "<bos>",
    "<eos>",
    "<|turn>",
    "<turn|>",
    "<|channel>",
    "<channel|>",
    "<|think|>",
    "<|tool>",
    "<tool|>",
    "<|tool_call>",
    "<tool_call|>",
    "<|tool_response>",
    "<tool_response|>",
    '<|"|>',
    "<|image|>",
    "<|audio|>",
    "<|video|>",
]
OLMO3_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<functions>",
    "</functions>",
    "<function_calls>",
    "</function_calls>",
    "<think>",
    "</think>",
]
REAL_TEMPLATES = {
    "Qwen-Qwen3-0.6B": (QWEN_SPECIALS, None, "<|im_end|>"),
    "Qwen-Qwen2.5-7B-Instruct": (QWEN_SPECIALS, None, "<|im_end|>"),
    "meta-llama-Llama-3.1-8B-Instruct": (LLAMA3_SPECIALS, "<|begin_of_text|>", "<|eot_id|>"),
    "meta-llama-Llama-3.2-3B-Instruct": (LLAMA3_SPECIALS, "<|begin_of_text|>", "<|eot_id|>"),
    "mistralai-Mistral-7B-Instruct-v0.3": (MISTRAL_SPECIALS, "<s>", "</s>"),
    "mistralai-Mistral-Nemo-Instruct-2407": (MISTRAL_SPECIALS, "<s>", "</s>"),
    "NousResearch-Hermes-3-Llama-3.1-8B-tool_use": (
        ["<|begin_of_text|>", *QWEN_SPECIALS], "<|begin_of_text|>", "<|im_end|>"),
    "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B": (
        DEEPSEEK_SPECIALS, "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
    "google-gemma-3-it": (["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"], "<bos>",
                          "<eos>"),
    "meta-llama-Llama-2-7b-chat-hf": (["<s>", "</s>"], "<s>", "</s>"),
    "openai-gpt-oss-120b": (GPT_OSS_SPECIALS, "<|startoftext|>", "<|return|>"),
    "Qwen-Qwen3.5-4B": (QWEN_SPECIALS, None, "<|im_end|>"),
    "google-gemma-4-E2B-it": (GEMMA4_SPECIALS, "<bos>", "<eos>"),
    "deepseek-ai-DeepSeek-V3.1": (
        DEEPSEEK_SPECIALS, "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
    "HuggingFaceTB-SmolLM3-3B": (QWEN_SPECIALS, None, "<|im_end|>"),
    "allenai-Olmo-3-32B-Think": (OLMO3_SPECIALS, None, "<|endoftext|>"),
}  # fmt: skip
TEMPLATE_DIR = __import__("pathlib").Path(__file__).parent / "data" / "templates"


def real_template_tokenizer(name: str, corpus: str) -> transformers.PreTrainedTokenizerFast:
    """A WordLevel tokenizer over `corpus`'s pieces with the real template `name` and its
    model's special tokens (render the test conversations once to get the corpus)."""
    specials, bos, eos = REAL_TEMPLATES[name]
    backend = word_level(pieces(corpus + WORDS), specials)
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=bos, eos_token=eos, pad_token="<pad>",
        unk_token="<unk>", additional_special_tokens=[s for s in specials if s not in (bos, eos)],
    )  # fmt: skip
    tokenizer.chat_template = (TEMPLATE_DIR / f"{name}.jinja").read_text(encoding="utf-8")
    return tokenizer
