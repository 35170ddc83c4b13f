"""Parameter-efficient methods on the offline demo: final eval loss, exact match, trained
parameters and tokens/s relative to LoRA, after the same steps.

  python benchmarks/bench_peft.py [--steps=300] [--methods=full,lora,dora,adalora]

Each method is configs/base.py (same seed, data and schedule) plus its METHODS overrides, run
through main.py in a fresh WORKDIR one after another in this process's run, so the tokens/s
ratios compare like with like (mean train/tokens_per_sec of the logged steps after the first
log, which holds the compile). The eval uses the first --eval_examples eval conversations for
both the loss and greedy exact match. On a GPU:

  python benchmarks/bench_peft.py --steps=800 --eval_examples=200
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

ADAPTERS = ["--config.lora.rank=16", "--config.lora.alpha=32", "--config.lora.dropout=0.0"]
METHODS: dict[str, list[str]] = {
    "full": [],
    "lora": ADAPTERS,
    "dora": [*ADAPTERS, "--config.lora.use_dora=True"],
    # init_r 16 pruned to an average of 8 per layer between steps 10% and 70% of the run.
    "adalora": [*ADAPTERS, "--config.lora.method=adalora", "--config.lora.adalora.target_r=8"],
    "prompt_tuning": ["--config.prompt.method=prompt_tuning"],
    "p_tuning": ["--config.prompt.method=p_tuning"],
    "prefix_tuning": ["--config.prompt.method=prefix_tuning"],
    "neftune": ["--config.train.neftune_noise_alpha=5"],  # full fine-tuning with NEFTune
}


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="optimizer updates per method")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated names")
    parser.add_argument("--eval_examples", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate, all methods")
    return parser.parse_args()


def schedule_overrides(name: str, steps: int) -> list[str]:
    if name != "adalora":
        return []
    return [f"--config.lora.adalora.tinit={steps // 10}",
            f"--config.lora.adalora.tfinal={3 * steps // 10}",
            f"--config.lora.adalora.delta_t={max(steps // 30, 1)}"]  # fmt: skip


def run_method(name: str, args: argparse.Namespace, workdir: Path) -> dict[str, float]:
    command = [
        sys.executable, "main.py", "--config=configs/base.py", f"--workdir={workdir}",
        f"--config.train.steps={args.steps}", f"--config.train.learning_rate={args.lr}",
        "--config.eval.every_steps=0", "--config.checkpoint.enabled=False",
        "--config.export.at_end=none", f"--config.data.eval_max_examples={args.eval_examples}",
        f"--config.eval.generate_examples={args.eval_examples}", "--config.eval.show_samples=0",
        f"--config.data.cache_dir={workdir / 'cache'}",
        *METHODS[name], *schedule_overrides(name, args.steps),
    ]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{name} failed:\n{result.stderr[-3000:]}")
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval/loss" in r]
    speeds = [r["train/tokens_per_sec"] for r in records if "train/tokens_per_sec" in r]
    speeds = speeds[1:] or speeds
    trained = re.search(r"trainable params: ([\d,]+)", result.stderr)
    return {
        "eval_loss_start": evals[0]["eval/loss"],
        "eval_loss": evals[-1]["eval/loss"],
        "exact_match": evals[-1]["eval/exact_match"],
        "trainable": int(trained.group(1).replace(",", "")) if trained else -1,
        "tokens_per_sec": statistics.mean(speeds),
    }


def main() -> None:
    args = parse()
    names = [n.strip() for n in args.methods.split(",") if n.strip()]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            results[name] = run_method(name, args, Path(tmp) / name)
            print(f"{name}: {json.dumps(results[name])}", file=sys.stderr, flush=True)
    reference = results.get("lora", {}).get("tokens_per_sec")
    print(f"| method | eval loss (start -> {args.steps} steps) | exact match | trainable "
          "parameters | tokens/s vs LoRA |")  # fmt: skip
    print("| --- | --- | --- | --- | --- |")
    for name, r in results.items():
        speed = f"{r['tokens_per_sec'] / reference:.2f}" if reference else "n/a"
        print(f"| {name} | {r['eval_loss_start']:.3f} -> {r['eval_loss']:.3f} | "
              f"{100 * r['exact_match']:.1f}% | {r['trainable']:,} | {speed} |")  # fmt: skip


if __name__ == "__main__":
    main()
