"""A GRPO update's throughput, sampling and training, against TRL's GRPOTrainer on the same
model, prompts, G and completion length.

  python benchmarks/bench_grpo.py --steps=6 --prompts=4 --generations=8 --completion=32

Both sides start from the shipped demo model (assets/demo_model: a 2-layer Llama, its
tokenizer and chat template) and the online RL demo's prompts (assets/demo_data/grpo_train
.jsonl), sample --generations completions of --prompts prompts per update at temperature 1,
up to --completion tokens, score them with the same reward (the share of even token ids: cheap
and never constant in a group, so every update has a gradient) and take one AdamW update
(dapo loss, beta 0, num_iterations 1). sft_jax: `main.py`'s run (the in-process sampler on
the training mesh, the compiled step), its times from metrics.jsonl (train/time/sampling_s;
train/time/update_s, from one rollout's end to the next one's start: the update). TRL:
GRPOTrainer without vLLM (transformers' generate), the time in the model's generate and the
rest of each step timed by a callback. The first --warmup updates (compilation, caches) are
left out.
Reported: sampled tokens/s, update tokens/s (the rows' prompt and completion tokens), whole
step tokens/s, and sft_jax / TRL ratios, one JSON line. On CPU only the ratios mean anything.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="updates measured")
    parser.add_argument("--warmup", type=int, default=2, help="updates left out first")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per update")
    parser.add_argument("--generations", type=int, default=8, help="completions per prompt (G)")
    parser.add_argument("--completion", type=int, default=32, help="max completion tokens")
    parser.add_argument("--no_torch", action="store_true", help="skip the TRL side")
    return parser.parse_args()


def even_tokens(prompts, completions, completion_ids, **columns):
    return [sum(t % 2 == 0 for t in ids) / max(len(ids), 1) for ids in completion_ids]


def prompts(count: int) -> list[dict]:
    lines = (REPO / "assets" / "demo_data" / "grpo_train.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines[:count]]


def sft_jax_side(args: argparse.Namespace, data: Path, workdir: Path) -> dict[str, float]:
    from configs import base
    from sft_jax.core.spec import RunSpec
    from sft_jax.loop import trainer
    from sft_jax.train.setup import open_run_data

    config = base.get_config().unlock()
    config.model.name_or_path = str(REPO / "assets" / "demo_model")
    config.train.objective = "grpo"
    config.data.train_files = str(data)
    config.data.eval_files = ""
    config.train.steps = args.warmup + args.steps
    config.train.global_batch_size = args.prompts * args.generations
    config.train.warmup_steps = 0
    config.train.learning_rate = 1e-6
    config.grpo.num_generations = args.generations
    config.grpo.max_prompt_length = 64
    config.grpo.max_completion_length = args.completion
    config.grpo.reward_funcs = "bench_grpo:even_tokens"
    config.grpo.max_sampling_logp_difference = 0.0
    config.eval.every_steps = 0
    config.eval.at_start = False
    config.checkpoint.enabled = False
    config.export.at_end = "none"
    config.log.every_steps = 1
    config.mesh.fsdp = 1
    config.mesh.data = -1
    trainer.run(RunSpec.of(config), workdir, data_factory=open_run_data)
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "train/time/sampling_s" in r][args.warmup :]
    per_step = (
        steps[-1]["train/num_tokens"] - rows_before(rows, steps[0])["train/num_tokens"]
    ) / len(steps)
    sampled = sum(
        r["train/completions/mean_length"] * config.train.global_batch_size for r in steps
    )
    # time/update_s: from the previous rollout's end to this one's start, the update between.
    update = np.mean([r["train/time/update_s"] for r in steps])
    return {
        "sampled_tokens_per_sec": sampled / sum(r["train/time/sampling_s"] for r in steps),
        "update_tokens_per_sec": per_step / update,
        "step_tokens_per_sec": per_step / np.mean([r["train/step_seconds"] for r in steps]),
    }


def rows_before(rows: list[dict], first: dict) -> dict:
    """The logged update before `first` (its cumulative token count)."""
    earlier = [r for r in rows if "train/num_tokens" in r and r["step"] < first["step"]]
    return earlier[-1] if earlier else {"train/num_tokens": 0}


def trl_side(args: argparse.Namespace, data: list[dict], workdir: Path) -> dict[str, float]:
    import datasets
    import transformers
    import trl

    model_dir = str(REPO / "assets" / "demo_model")
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32")
    times: dict[str, list[float]] = {"generate": [], "step": [], "tokens": []}
    generate = model.generate

    def timed_generate(*a, **k):
        start = time.perf_counter()
        out = generate(*a, **k)
        times["generate"].append(time.perf_counter() - start)
        return out

    model.generate = timed_generate

    class Clock(transformers.TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__):
            times["step"].append(time.perf_counter() - self.start)

        def on_log(self, _args, _state, _control, logs=None, **__):
            if logs and "completions/mean_length" in logs:
                times["tokens"].append(logs["completions/mean_length"])

    config = trl.GRPOConfig(
        output_dir=str(workdir),
        per_device_train_batch_size=args.prompts * args.generations,
        num_generations=args.generations,
        max_completion_length=args.completion,
        max_steps=args.warmup + args.steps,
        learning_rate=1e-6,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        bf16=False,
    )
    trainer = trl.GRPOTrainer(
        model=model,
        reward_funcs=even_tokens,
        args=config,
        train_dataset=datasets.Dataset.from_list(
            [{"prompt": r["prompt"], "solution": r["solution"]} for r in data]
        ),
        processing_class=tokenizer,
        callbacks=[Clock()],
    )
    trainer.train()
    rows = args.prompts * args.generations
    keep = slice(args.warmup, None)
    sampled = sum(length * rows for length in times["tokens"][keep])
    prompt_tokens = _prompt_tokens(tokenizer, data, args)
    total = sum(times["step"][keep])
    sampling = sum(times["generate"][keep])
    tokens = prompt_tokens * args.steps + sampled
    return {
        "sampled_tokens_per_sec": sampled / sampling,
        "update_tokens_per_sec": tokens / (total - sampling),
        "step_tokens_per_sec": tokens / total,
    }


def _prompt_tokens(tokenizer, data: list[dict], args: argparse.Namespace) -> float:
    """Prompt tokens of one update's rows (the mean prompt, times its rows)."""
    lengths = [
        len(tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=True))
        for r in data
    ]
    return sum(lengths) / len(lengths) * args.prompts * args.generations


def main() -> None:
    args = parse()
    count = (args.warmup + args.steps) * args.prompts
    data = prompts(count)
    result = {"config": vars(args)}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "prompts.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in data))
        sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_grpo:even_tokens
        result["sft_jax"] = sft_jax_side(args, path, Path(tmp) / "sft_jax")
        if not args.no_torch:
            result["trl"] = trl_side(args, data, Path(tmp) / "trl")
            result["ratio"] = {
                k: result["sft_jax"][k] / result["trl"][k] for k in result["sft_jax"]
            }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
