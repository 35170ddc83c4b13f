"""A tiny random Llama with a word-level tokenizer, and three local lm-eval tasks over jsonl
files (multiple choice, generation with a regex filter, rolling perplexity), for the harness
tests and benchmarks/bench_eval.py."""

from __future__ import annotations

import json
import random
from pathlib import Path

import transformers
from chat_tokenizers import WORDS, make_tokenizer
from hf_models import randomize_

MAX_LENGTH = 48  # the model's context: rolling windows and left truncation both happen
TASKS = ("tiny_mc", "tiny_gen", "tiny_ppl")

_MC = """task: tiny_mc
dataset_path: json
dataset_kwargs: {{data_files: {{train: {dir}/mc.jsonl, test: {dir}/mc.jsonl}}}}
training_split: train
test_split: test
output_type: multiple_choice
doc_to_text: "What is {{{{a}}}} + {{{{b}}}} ? Answer :"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
target_delimiter: " "
metric_list: [{{metric: acc}}, {{metric: acc_norm}}]
"""
_GEN = """task: tiny_gen
dataset_path: json
dataset_kwargs: {{data_files: {{train: {dir}/gen.jsonl, test: {dir}/gen.jsonl}}}}
training_split: train
test_split: test
output_type: generate_until
doc_to_text: "What is {{{{a}}}} + {{{{b}}}} ? Answer :"
doc_to_target: "{{{{answer}}}}"
generation_kwargs: {{until: ["?", "!"], max_gen_toks: 10, do_sample: false}}
filter_list:
  - name: number
    filter: [{{function: regex, regex_pattern: "(\\\\d+)"}}, {{function: take_first}}]
metric_list: [{{metric: exact_match}}]
"""
_PPL = """task: tiny_ppl
dataset_path: json
dataset_kwargs: {{data_files: {{test: {dir}/ppl.jsonl}}}}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list: [{{metric: word_perplexity}}, {{metric: byte_perplexity}}, {{metric: bits_per_byte}}]
"""


def save_model(
    path: Path, seed: int = 0, hidden: int = 32, layers: int = 2, experts: int = 0
) -> None:
    """A random Llama (weights large enough that logits are far from ties; with `experts`, a
    Mixtral of that many experts, 2 a token) and a Llama 3 style word-level tokenizer that puts
    BOS in front of text, saved in `path`."""
    tokenizer = make_tokenizer("llama3", corpus=WORDS)
    tokenizer.save_pretrained(path)
    fields = dict(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=MAX_LENGTH, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    if experts:
        config = transformers.MixtralConfig(
            **fields, num_local_experts=experts, num_experts_per_tok=2
        )
        model = transformers.MixtralForCausalLM(config)
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**fields))
    randomize_(model, seed)
    model.save_pretrained(path)


def write_tasks(path: Path, docs: int = 6, seed: int = 0) -> Path:
    """The three tasks' YAML and jsonl files in `path` (an lm-eval include_path)."""
    rng = random.Random(seed)
    mc, gen, ppl = [], [], []
    for _ in range(docs):
        a, b = rng.randrange(50), rng.randrange(50)
        choices = [str(a + b), str(a + b + 1), str(abs(a - b)), f"{a} {b}"]
        mc.append({"a": a, "b": b, "choices": choices, "label": rng.randrange(len(choices))})
        gen.append({"a": a, "b": b, "answer": str(a + b)})
        # 20 to 40 words, some past the 48-token context: several rolling windows.
        words = [str(rng.randrange(1000)) for _ in range(rng.randrange(20, 40))]
        ppl.append({"text": " ".join(words) + " ."})
    for name, rows in (("mc", mc), ("gen", gen), ("ppl", ppl)):
        (path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name, template in (("mc", _MC), ("gen", _GEN), ("ppl", _PPL)):
        (path / f"{name}.yaml").write_text(template.format(dir=path))
    return path
