"""Prompts for the online RL demo: sums the SFT demo model was never trained on.

  python scripts/make_grpo_data.py   # writes assets/demo_data/grpo_{train,eval}.jsonl

The SFT demo learns "a two-digit plus a one-digit number" (scripts/make_demo_assets.py). These
prompts ask for what it gets partly wrong: adding 0 (answered right about a quarter of the time
after SFT) and the one-digit number first ("Add 7 and 45.", a few percent), in the same four
phrasings. Each record is TRL's prompt format: a chat `prompt` and the `solution`, which the
"math" reward compares by value. Eval prompts never appear in train; seeded, so reproducible.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "assets" / "demo_data"
PHRASINGS = (
    "Add {a} and {b}.",
    "What is {a} + {b}?",
    "Compute {a} plus {b}.",
    "What is {a} plus {b}?",
)


def sums(rng: random.Random) -> tuple[list, list]:
    """(n + 0 sums, d + n sums) as (question, answer), shuffled; d one digit, n two digits."""
    zeros = [(p.format(a=n, b=0), n) for n in range(10, 100) for p in PHRASINGS]
    firsts = [
        (p.format(a=d, b=n), d + n) for n in range(10, 100) for d in range(1, 10) for p in PHRASINGS
    ]
    rng.shuffle(zeros)
    rng.shuffle(firsts)
    return zeros, firsts


def record(question: str, answer: int) -> dict:
    return {"prompt": [{"role": "user", "content": question}], "solution": str(answer)}


def main() -> None:
    rng = random.Random(0)
    zeros, firsts = sums(rng)
    held_out = zeros[:32] + firsts[:32]  # half of each kind
    train = zeros[32:] + firsts[32 : 32 + len(zeros) - 32]  # as many of each kind
    rng.shuffle(train)
    for split, rows in (("train", train), ("eval", held_out)):
        text = "".join(json.dumps(record(*row)) + "\n" for row in rows)
        (DATA / f"grpo_{split}.jsonl").write_text(text)
        print(f"{split}: {len(rows)} prompts")


if __name__ == "__main__":
    main()
