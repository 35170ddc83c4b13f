"""Synthetic preference pairs from the demo chats: the right reply against a wrong one.

  python scripts/make_preference_data.py   # writes assets/demo_data/preference_{train,eval}.jsonl

Each demo conversation gives one pair: the messages before its last reply are the prompt, the
reply is "chosen", and a wrong answer of the same kind is "rejected" (a number off by 1 to 3, or
the same letters in another order), seeded, so the files are reproducible.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "assets" / "demo_data"


def wrong_answer(answer: str, rng: random.Random) -> str:
    """A plausible wrong reply: a nearby number, or the letters in another order."""
    if answer.isdigit():
        return str(max(0, int(answer) + rng.choice([-3, -2, -1, 1, 2, 3])))
    letters = answer.split()
    if len(set(letters)) < 2:
        return answer + " " + answer
    wrong = letters[:]
    while wrong == letters:
        rng.shuffle(wrong)
    return " ".join(wrong)


def pairs(source: Path, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for line in source.read_text().splitlines():
        messages = json.loads(line)["messages"]
        prompt, reply = messages[:-1], messages[-1]["content"]
        out.append({
            "prompt": prompt,
            "chosen": [{"role": "assistant", "content": reply}],
            "rejected": [{"role": "assistant", "content": wrong_answer(reply, rng)}],
        })  # fmt: skip
    return out


def main() -> None:
    for split, seed in (("train", 0), ("eval", 1)):
        rows = pairs(DATA / f"{split}.jsonl", seed)
        text = "".join(json.dumps(row) + "\n" for row in rows)
        (DATA / f"preference_{split}.jsonl").write_text(text)
        print(f"{split}: {len(rows)} pairs")


if __name__ == "__main__":
    main()
