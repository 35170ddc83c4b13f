"""Tokenization + masking throughput on multi-turn conversations, against a train step's appetite.

  python benchmarks/bench_data.py [--conversations=4000] [--workers=1,2]
  python benchmarks/bench_data.py --tool_conversations=10000


Generates multi-turn chats (system prompt, 2-4 user/assistant exchanges of random words),
trains a byte-level BPE tokenizer with a ChatML template on them (no download), then times the
whole data path: chat-template rendering, prefix renders that verify every assistant span,
tokenization with offsets, masks, truncation; and packing into rows. Reports tokens/s, per
core for one process. The appetite printed beside it is what one accelerator's train step
consumes at a given MFU (tokens/s = MFU x peak FLOP/s / FLOPs per token): the data path
keeps up when tokens/s per core x cores per accelerator is far above it.

--tool_conversations=N times N tool-use conversations (a calculator tool: the call, its
result, the answer; 1-3 exchanges) through Qwen2.5's real template (tests/data/templates):
tokenization with verified spans (a prefix render per trained turn) against plain rendering
(one render and one tokenization per conversation, no spans), as a ratio from one run.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import tokenizers
import transformers

from sft_jax.data import batches
from sft_jax.data.records import Record
from sft_jax.data.templates import CHATML
from sft_jax.data.tokenize import Options, tokenize_records
from sft_jax.models import from_hf_config
from sft_jax.train.flops import training_flops_per_token

WORDS = " ".join(
    [
        "the a model data train token answer question please explain why how what when list",
        "sort number value result first second third because then therefore example simple",
        "short long write code function return print input output error fix test check loop",
    ]
).split()


def conversations(count: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)

    def sentence(low: int, high: int) -> str:
        return " ".join(rng.choice(WORDS, int(rng.integers(low, high)))) + "."

    out = []
    for _ in range(count):
        messages = [{"role": "system", "content": sentence(5, 15)}]
        for _ in range(int(rng.integers(2, 5))):
            messages.append({"role": "user", "content": sentence(10, 60)})
            messages.append({"role": "assistant", "content": sentence(20, 150)})
        out.append({"messages": messages})
    return out


TOOLS = [{"type": "function", "function": {
    "name": "calculator", "description": "Evaluate an arithmetic expression.",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}},
                   "required": ["expression"]}}}]  # fmt: skip
QWEN2_5 = (
    Path(__file__).resolve().parents[1] / "tests/data/templates/Qwen-Qwen2.5-7B-Instruct.jinja"
)


def tool_conversations(count: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for n in range(count):
        messages = [{"role": "system", "content": "You can use a calculator."}]
        for k in range(int(rng.integers(1, 4))):
            a, b = (int(x) for x in rng.integers(0, 1000, 2))
            call_id = f"call_{n}_{k}"
            messages += [
                {"role": "user", "content": f"What is {a} times {b}? " + " ".join(
                    rng.choice(WORDS, int(rng.integers(5, 30))))},
                {"role": "assistant", "content": "", "tool_calls": [{
                    "type": "function", "id": call_id, "function": {
                        "name": "calculator", "arguments": {"expression": f"{a} * {b}"}}}]},
                {"role": "tool", "content": str(a * b), "tool_call_id": call_id},
                {"role": "assistant", "content": f"{a} times {b} is {a * b}."},
            ]  # fmt: skip
        out.append({"messages": messages, "tools": TOOLS})
    return out


def tool_ratio(
    tokenizer: transformers.PreTrainedTokenizerBase, count: int, max_length: int
) -> dict:
    """Tokens/s of tokenization with spans and of plain rendering, on tool conversations."""
    tokenizer.chat_template = QWEN2_5.read_text(encoding="utf-8")
    rows = tool_conversations(count)
    records = [Record(f"bench:{i}", row) for i, row in enumerate(rows)]
    options = Options("messages", "all_assistant", max_length, skip_bad=False)
    start = time.perf_counter()
    tokenized = tokenize_records(tokenizer, records, options)
    spans_seconds = time.perf_counter() - start
    start = time.perf_counter()
    plain_tokens = 0
    for row in rows:
        text = tokenizer.apply_chat_template(row["messages"], tools=row["tools"], tokenize=False)
        plain_tokens += len(tokenizer(text, add_special_tokens=False)["input_ids"])
    plain_seconds = time.perf_counter() - start
    spans_rate = tokenized.stats["tokens"] / spans_seconds
    plain_rate = plain_tokens / plain_seconds
    print(f"{count} tool conversations ({tokenized.stats['documents']} documents, "
          f"{tokenized.stats['trainable_tokens']:,} trainable of {tokenized.stats['tokens']:,} "
          f"tokens), one process:")  # fmt: skip
    print(f"  with verified spans: {spans_rate:,.0f} tokens/s ({spans_seconds:.1f} s)")
    print(f"  plain rendering:     {plain_rate:,.0f} tokens/s ({plain_seconds:.1f} s)")
    print(f"  ratio spans / plain: {spans_rate / plain_rate:.2f}")
    return {"tool_tokens_per_sec_spans": spans_rate, "tool_tokens_per_sec_plain": plain_rate,
            "tool_spans_over_plain": spans_rate / plain_rate}  # fmt: skip


def make_tokenizer(texts: list[str]) -> transformers.PreTrainedTokenizerBase:
    backend = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token=None))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = tokenizers.decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=4096,
        special_tokens=specials,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(texts, trainer)
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tokenizer.chat_template = CHATML
    return tokenizer


def appetite(shape: dict, seq: int, peak_tflops: float, mfu: float) -> float:
    config = from_hf_config(transformers.LlamaConfig(**shape))
    return mfu * peak_tflops * 1e12 / training_flops_per_token(config, seq)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--conversations", type=int, default=4000)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--max_length", type=int, default=4096)
    parser.add_argument("--tool_conversations", type=int, default=0)
    args = parser.parse_args()

    rows = conversations(args.conversations)
    texts = [m["content"] for row in rows[:500] for m in row["messages"]]
    tokenizer = make_tokenizer(texts)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)  # what worker processes would load: a real tokenizer
        tokenizer = transformers.AutoTokenizer.from_pretrained(tmp)
    if args.tool_conversations:
        print(json.dumps(tool_ratio(tokenizer, args.tool_conversations, args.max_length)))
        return
    records = [Record(f"bench:{i}", row) for i, row in enumerate(rows)]
    options = Options("messages", "all_assistant", args.max_length, skip_bad=False)
    print(f"{args.conversations} conversations, {os.cpu_count()} cores here")
    print(f"{'workers':>8} {'seconds':>9} {'tokens/s':>12} {'tokens/s/core':>14}")
    per_core = {}
    for workers in (int(w) for w in args.workers.split(",")):
        start = time.perf_counter()
        tokenized = tokenize_records(tokenizer, records, options, workers)
        seconds = time.perf_counter() - start
        tokens = tokenized.stats["tokens"]
        per_core[workers] = tokens / seconds / workers
        print(f"{workers:>8} {seconds:>9.2f} {tokens / seconds:>12,.0f} "
              f"{tokens / seconds / workers:>14,.0f}")  # fmt: skip
    start = time.perf_counter()
    packed = batches.epoch_rows(tokenized, args.max_length, True, seed=0, epoch=0, shuffle=True)
    made = batches.make_rows(tokenized, packed, args.max_length)
    pack_seconds = time.perf_counter() - start
    filled = int((made["segment_ids"] > 0).sum()) / made["segment_ids"].size
    print(f"packing + row arrays: {tokens / pack_seconds:,.0f} tokens/s "
          f"({len(packed)} rows, {filled:.1%} of slots filled)")  # fmt: skip
    print(f"trainable tokens: {tokenized.stats['trainable_tokens']:,} of {tokens:,}")
    llama_1b = {
        "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
        "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
    }  # fmt: skip
    need = appetite(llama_1b, args.max_length, peak_tflops=989.0, mfu=0.6)
    print(f"appetite of a Llama-3.2-1B-like train step on one H100 at 60% MFU, seq "
          f"{args.max_length}: {need:,.0f} tokens/s")  # fmt: skip
    print(json.dumps({"tokens_per_sec_per_core": per_core, "appetite_tokens_per_sec": need}))


if __name__ == "__main__":
    main()
