"""Builds the offline demo: a synthetic chat dataset, its tokenizer and a random tiny Llama.

Run (deterministic from --seed; rewrites every file under --out):
  python scripts/make_demo_assets.py --out=assets

Writes
  OUT/demo_data/train.jsonl, OUT/demo_data/eval.jsonl   {"messages": [...]} per line
  OUT/demo_model/   config.json, model.safetensors (float32), generation_config.json,
                    tokenizer.json, tokenizer_config.json, chat template (ChatML)

Tasks (each phrased several ways; some conversations have a system prompt or two exchanges):
  "Add 47 and 5."                  -> "52"
  "Sort these letters: d b a"      -> "a b d"
  "Reverse: c a t"                 -> "t a c"
  "Count the letters: x q z"       -> "3"
Every answer is short and checkable, so greedy generation is scored by exact match. No eval task
instance (task and operands, whatever the phrasing) appears in train. With configs/base.py the
random-initialized model goes from 0% to 100% exact match in 800 updates (configs/base.py), in
about 3.5 minutes on 2 CPU cores.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

import tokenizers
import torch
import transformers
from absl import app, flags
from tokenizers import decoders, models, pre_tokenizers, trainers

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "assets", "Output directory (demo_data/ and demo_model/ go inside).")
flags.DEFINE_integer("seed", 0, "Seed of the data, of the tokenizer corpus and of the weights.")
flags.DEFINE_integer("train_size", 8000, "Conversations in train.jsonl.")
flags.DEFINE_integer("eval_size", 200, "Conversations in eval.jsonl.")
flags.DEFINE_integer(
    "vocab_size", 512, "Most tokens in the vocabulary (BPE stops sooner once every word is one)."
)
flags.DEFINE_integer("hidden_size", 128, "Model width D.")
flags.DEFINE_integer("intermediate_size", 384, "MLP width F.")
flags.DEFINE_integer("num_layers", 2, "Decoder layers.")
flags.DEFINE_integer("num_heads", 4, "Query heads (head_dim = hidden_size / num_heads).")
flags.DEFINE_integer("num_kv_heads", 2, "Key/value heads (grouped-query attention).")

# ---------------------------------------------------------------- chat format
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END]  # ids 0, 1, 2
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Qwen2's pre-tokenizer split, but one digit per piece: numbers tokenize digit by digit.
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
MAX_POSITIONS = 1024

# ---------------------------------------------------------------- tasks
LETTERS = "abcdefghijklmnopqrstuvwxyz"
SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a careful assistant. Reply with the answer only.",
    "Answer briefly and exactly.",
    "You are a precise calculator and text tool.",
)
SYSTEM_FRACTION = 0.3  # conversations that start with a system prompt
MULTI_TURN_FRACTION = 0.25  # conversations of two user/assistant exchanges

# A task instance: (key naming the task and its operands, user instruction, reference answer).
Instance = tuple[tuple, str, str]


def _spaced(items: list[str]) -> str:
    return " ".join(items)


def add_task(rng: random.Random) -> Instance:
    # A two-digit plus a one-digit number: learnable in a couple of minutes from scratch,
    # where two two-digit numbers take several times longer.
    a, b = rng.randint(10, 99), rng.randint(1, 9)
    phrasing = rng.choice(
        ["Add {a} and {b}.", "What is {a} + {b}?", "Compute {a} plus {b}.", "What is {a} plus {b}?"]
    )
    return ("add", a, b), phrasing.format(a=a, b=b), str(a + b)


def sort_task(rng: random.Random) -> Instance:
    letters = rng.sample(LETTERS, rng.randint(3, 6))
    phrasing = rng.choice(
        ["Sort these letters: {x}", "Put in alphabetical order: {x}", "Sort alphabetically: {x}"]
    )
    return ("sort", *letters), phrasing.format(x=_spaced(letters)), _spaced(sorted(letters))


def reverse_task(rng: random.Random) -> Instance:
    letters = rng.sample(LETTERS, rng.randint(3, 6))  # distinct: each letter says where it was
    phrasing = rng.choice(
        ["Reverse: {x}", "Reverse the order of these letters: {x}", "Write backwards: {x}"]
    )
    return ("reverse", *letters), phrasing.format(x=_spaced(letters)), _spaced(letters[::-1])


def count_task(rng: random.Random) -> Instance:
    letters = rng.choices(LETTERS, k=rng.randint(2, 9))
    phrasing = rng.choice(
        ["Count the letters: {x}", "How many letters are in: {x}", "How many items: {x}"]
    )
    return ("count", *letters), phrasing.format(x=_spaced(letters)), str(len(letters))


# Each task and its share of the exchanges: the slowest to learn (addition) gets the most.
TASKS: tuple[tuple[Callable[[random.Random], Instance], float], ...] = (
    (add_task, 0.5),
    (sort_task, 0.2),
    (reverse_task, 0.17),
    (count_task, 0.13),
)


# ---------------------------------------------------------------- conversations
def conversation(rng: random.Random, is_taken: Callable[[tuple], bool]) -> tuple[list, list]:
    """One conversation and the keys of its task instances; instances `is_taken` are redrawn."""
    tasks, weights = zip(*TASKS, strict=True)
    messages, keys = [], []
    if rng.random() < SYSTEM_FRACTION:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    for _ in range(2 if rng.random() < MULTI_TURN_FRACTION else 1):
        while True:
            key, question, answer = rng.choices(tasks, weights)[0](rng)
            if not is_taken(key) and key not in keys:
                break
        keys.append(key)
        messages.append({"role": "user", "content": question})
        messages.append({"role": "assistant", "content": answer})
    return messages, keys


def make_splits(seed: int, train_size: int, eval_size: int) -> tuple[list, list]:
    """Eval first; train then never reuses an eval instance (nor does eval repeat one)."""
    rng = random.Random(seed)
    eval_keys: set[tuple] = set()
    eval_set = []
    for _ in range(eval_size):
        messages, keys = conversation(rng, eval_keys.__contains__)
        eval_keys.update(keys)
        eval_set.append({"messages": messages})
    train_set = [
        {"messages": conversation(rng, eval_keys.__contains__)[0]} for _ in range(train_size)
    ]
    return train_set, eval_set


def write_jsonl(path: Path, examples: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for example in examples:
            f.write(json.dumps(example, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------- tokenizer
def train_tokenizer(examples: list[dict], vocab_size: int) -> transformers.PreTrainedTokenizerFast:
    """Byte-level BPE trained on the message texts, with ChatML special tokens."""
    tokenizer = tokenizers.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(tokenizers.Regex(SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = ["system\nuser\nassistant\n"]
    texts += [m["content"] + "\n" for example in examples for m in example["messages"]]
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=ENDOFTEXT,
        pad_token=ENDOFTEXT,
        chat_template=CHAT_TEMPLATE,
        model_max_length=MAX_POSITIONS,
        clean_up_tokenization_spaces=False,
    )


# ---------------------------------------------------------------- model
def save_model(out_dir: Path, tokenizer: transformers.PreTrainedTokenizerFast, seed: int) -> None:
    """A random-initialized LlamaForCausalLM (float32 safetensors) and its tokenizer."""
    endoftext, im_end = tokenizer.convert_tokens_to_ids([ENDOFTEXT, IM_END])
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=FLAGS.hidden_size,
        intermediate_size=FLAGS.intermediate_size,
        num_hidden_layers=FLAGS.num_layers,
        num_attention_heads=FLAGS.num_heads,
        num_key_value_heads=FLAGS.num_kv_heads,
        max_position_embeddings=MAX_POSITIONS,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=endoftext,
        pad_token_id=endoftext,
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    model.generation_config = transformers.GenerationConfig(
        eos_token_id=[im_end, endoftext], pad_token_id=endoftext, do_sample=False
    )
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def main(argv: list[str]) -> None:
    del argv
    out = Path(FLAGS.out)
    train_set, eval_set = make_splits(FLAGS.seed, FLAGS.train_size, FLAGS.eval_size)
    write_jsonl(out / "demo_data" / "train.jsonl", train_set)
    write_jsonl(out / "demo_data" / "eval.jsonl", eval_set)
    tokenizer = train_tokenizer(train_set, FLAGS.vocab_size)
    save_model(out / "demo_model", tokenizer, FLAGS.seed)
    print(f"wrote {len(train_set)} train and {len(eval_set)} eval conversations, ", end="")
    print(f"a {len(tokenizer)}-token tokenizer and a model to {out}")


if __name__ == "__main__":
    app.run(main)
