"""Parameter-efficient methods on the offline demo, each steering a trained model to a format it
gets wrong: eval loss and exact match before and after the same steps, trained parameters, and
tokens/s relative to full fine-tuning in the same run.

  python benchmarks/bench_peft.py [--base=DIR] [--steps=200] [--methods=full,lora,...]

Protocol (one seed, the same data, steps and schedule for every method; methods one after
another in this process's run, so the tokens/s ratios compare like with like):
1. The start: the SFT demo's export (`python main.py --config=configs/base.py
   --workdir=/tmp/sft_demo` writes /tmp/sft_demo/export, which configs/dpo_demo.py starts from
   too); without --base it is trained here first, 800 full fine-tuning updates of configs/base.py.
   It answers the demo tasks, including "Reverse: c a t" -> "t a c".
2. The new format it gets wrong: the letters alone, with no instruction ("c a t" -> "t a c").
   Train and eval instances are fresh letter sequences (seeded), none of the demo's reverse
   instances, eval disjoint from train. A prompt, a prefix or an adapter has to carry "reverse".
3. Each method trains from the start model on the new format; eval (loss and greedy exact match
   over the first --eval_examples eval conversations) before the first update and after the last.
   The learning rate is the method's own (METHODS; --learning_rates overrides them), as is
   usual: virtual tokens train at 1e-2 and above in PEFT's examples, adapters near 1e-3,
   full fine-tuning of a trained model lower still.

tokens/s is the mean train/tokens_per_sec of the logged steps after the first log (which holds
the compile); prompt and P-tuning count their virtual tokens' slots as tokens. On a GPU:

  python benchmarks/bench_peft.py --steps=300 --eval_examples=200
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO_DATA = REPO / "assets" / "demo_data"

ADAPTERS = ["--config.lora.rank=16", "--config.lora.alpha=32", "--config.lora.dropout=0.0"]
# name: (learning rate, overrides of configs/base.py)
METHODS: dict[str, tuple[float, list[str]]] = {
    "full": (3e-4, []),
    "lora": (3e-3, ADAPTERS),
    "dora": (3e-3, [*ADAPTERS, "--config.lora.use_dora=True"]),
    # init_r 16 pruned to an average of 8 per layer (schedule_overrides). P, Q ~ N(0, 0.02) and
    # Lambda = 0 as PEFT starts them: a higher rate than LoRA's.
    "adalora": (
        2e-2,
        [*ADAPTERS, "--config.lora.method=adalora", "--config.lora.adalora.target_r=8"],
    ),
    "prompt_tuning": (1e-1, ["--config.prompt.method=prompt_tuning"]),  # N(0, 1) init, N = 20
    "p_tuning": (1e-2, ["--config.prompt.method=p_tuning"]),  # MLP encoder, H = D
    "prefix_tuning": (1e-2, ["--config.prompt.method=prefix_tuning"]),
    "neftune": (3e-4, ["--config.train.neftune_noise_alpha=5"]),  # full fine-tuning + NEFTune
}
LETTERS = "abcdefghijklmnopqrstuvwxyz"
REVERSE_PHRASINGS = ("Reverse: ", "Reverse the order of these letters: ", "Write backwards: ")


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="", help="the SFT demo's export; '' = train it here")
    parser.add_argument("--steps", type=int, default=200, help="optimizer updates per method")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated names")
    parser.add_argument("--learning_rates", default="",
                        help="per-method overrides of METHODS' rates: name=rate,...")  # fmt: skip
    parser.add_argument("--batch", type=int, default=16, help="rows per update, all methods")
    parser.add_argument("--eval_examples", type=int, default=100)
    parser.add_argument("--train_examples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base_steps", type=int, default=0,
                        help="without --base: the demo's updates (0: its config's)")  # fmt: skip
    return parser.parse_args()


def main_py(workdir: Path, *overrides: str) -> str:
    """Runs main.py on configs/base.py with `overrides`; its log (stderr)."""
    command = [sys.executable, "main.py", "--config=configs/base.py", f"--workdir={workdir}",
               f"--config.data.cache_dir={workdir.parent / 'cache'}", *overrides]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{workdir.name} failed:\n{result.stderr[-3000:]}")
    return result.stderr


def train_start_model(tmp: Path, steps: int = 0) -> Path:
    """The SFT demo (configs/base.py as is; `steps` updates unless 0), exported at its last step."""
    more = [f"--config.train.steps={steps}"] if steps else []
    main_py(tmp / "sft", *more, "--config.eval.every_steps=0", "--config.eval.at_start=False",
            "--config.eval.generate_examples=0", "--config.checkpoint.every_steps=0",
            "--config.export.at_end=last")  # fmt: skip
    return tmp / "sft" / "export"


def demo_reverse_instances() -> set[tuple[str, ...]]:
    """The letter sequences of every reverse instance of the demo data (train and eval)."""
    seen = set()
    for split in ("train", "eval"):
        for line in (DEMO_DATA / f"{split}.jsonl").read_text().splitlines():
            for message in json.loads(line)["messages"]:
                text = message["content"]
                if message["role"] == "user" and text.startswith(REVERSE_PHRASINGS):
                    seen.add(tuple(text.split(": ", 1)[1].split()))
    return seen


def write_new_format(out: Path, train_size: int, eval_size: int, seed: int) -> None:
    """train.jsonl and eval.jsonl of the new format: distinct letters alone -> reversed."""
    rng, taken = random.Random(seed), demo_reverse_instances()
    splits = {"eval": eval_size, "train": train_size}  # eval drawn first, train avoids it
    out.mkdir(parents=True, exist_ok=True)
    for split, size in splits.items():
        lines = []
        while len(lines) < size:
            letters = tuple(rng.sample(LETTERS, rng.randint(3, 6)))
            if letters in taken:
                continue
            taken.add(letters)
            messages = [{"role": "user", "content": " ".join(letters)},
                        {"role": "assistant", "content": " ".join(letters[::-1])}]  # fmt: skip
            lines.append(json.dumps({"messages": messages}))
        (out / f"{split}.jsonl").write_text("\n".join(lines) + "\n")


def schedule_overrides(name: str, steps: int) -> list[str]:
    if name != "adalora":
        return []
    return [f"--config.lora.adalora.tinit={steps // 10}",
            f"--config.lora.adalora.tfinal={3 * steps // 10}",
            f"--config.lora.adalora.delta_t={max(steps // 30, 1)}"]  # fmt: skip


def run_method(name: str, args: argparse.Namespace, base: Path, data: Path, tmp: Path) -> dict:
    learning_rate, overrides = METHODS[name]
    chosen = dict(pair.split("=") for pair in args.learning_rates.split(",") if pair)
    learning_rate = float(chosen.get(name, learning_rate))
    log = main_py(
        tmp / name, f"--config.model.name_or_path={base}",
        f"--config.data.train_files={data / 'train.jsonl'}",
        f"--config.data.eval_files={data / 'eval.jsonl'}",
        f"--config.train.steps={args.steps}", f"--config.train.learning_rate={learning_rate}",
        f"--config.train.warmup_steps={max(args.steps // 10, 1)}",
        f"--config.train.global_batch_size={args.batch}", f"--config.train.seed={args.seed}",
        "--config.eval.every_steps=0", "--config.checkpoint.enabled=False",
        "--config.export.at_end=none", f"--config.data.eval_max_examples={args.eval_examples}",
        f"--config.eval.generate_examples={args.eval_examples}", "--config.eval.show_samples=0",
        *overrides, *schedule_overrides(name, args.steps),
    )  # fmt: skip
    records = [json.loads(line) for line in (tmp / name / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval/loss" in r]
    speeds = [r["train/tokens_per_sec"] for r in records if "train/tokens_per_sec" in r]
    trained = re.search(r"trainable params: ([\d,]+)", log)
    return {
        "learning_rate": learning_rate,
        "eval_loss": (evals[0]["eval/loss"], evals[-1]["eval/loss"]),
        "exact_match": (evals[0]["eval/exact_match"], evals[-1]["eval/exact_match"]),
        "trainable": int(trained.group(1).replace(",", "")) if trained else -1,
        "tokens_per_sec": statistics.mean(speeds[1:] or speeds),
    }


def table(results: dict[str, dict], steps: int) -> str:
    reference = results.get("full", {}).get("tokens_per_sec")
    lines = [f"| method | learning rate | eval loss (start -> {steps} steps) | exact match "
             f"(start -> {steps} steps) | trainable parameters | tokens/s vs full |",
             "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for name, r in results.items():
        speed = f"{r['tokens_per_sec'] / reference:.2f}" if reference else "n/a"
        (loss0, loss1), (match0, match1) = r["eval_loss"], r["exact_match"]
        lines.append(f"| {name} | {r['learning_rate']:g} | {loss0:.3f} -> {loss1:.3f} | "
                     f"{100 * match0:.1f}% -> {100 * match1:.1f}% | {r['trainable']:,} | "
                     f"{speed} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    args = parse()
    names = [n.strip() for n in args.methods.split(",") if n.strip()]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = Path(args.base) if args.base else train_start_model(tmp, args.base_steps)
        write_new_format(tmp / "data", args.train_examples, args.eval_examples, args.seed)
        for name in names:
            results[name] = run_method(name, args, base, tmp / "data", tmp)
            print(f"{name}: {json.dumps(results[name])}", file=sys.stderr, flush=True)
    print(table(results, args.steps))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
