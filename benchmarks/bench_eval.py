"""lm-eval requests/s of model type sft_jax relative to lm-eval's own `hf` backend.

  python benchmarks/bench_eval.py --docs=64 --hidden=64 --layers=2 --batch_size=8
  python benchmarks/bench_eval.py --torch_threads=1   # on a loaded CPU

One tiny random Llama with a word-level tokenizer (tests/evaluation/tiny_tasks.py) saved to a
temporary directory, which both backends load, and three local tasks of --docs documents each:
multiple choice (4 loglikelihood requests a document), generation with a regex filter (up to
10 new tokens, greedy) and rolling perplexity (windows of the model's 48-token context).
Each backend runs lm_eval.simple_evaluate over all three twice with the same batch size: the
first run (compilation included for sft_jax), then the measured one. Timed: the seconds spent
in the backend's loglikelihood, loglikelihood_rolling and generate_until calls (tokenization,
batching, the model; not lm-eval's task building, shared by both). Reported: requests/s of
each run and backend, the ratio sft_jax / hf of the second runs, one JSON line. The figures
of a model this small say how much each backend spends around the model, not in it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "tests" / "evaluation")]

import torch  # noqa: E402
from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from tiny_tasks import TASKS, save_model, write_tasks  # noqa: E402

from sft_jax.evaluation.harness import SftJaxLM  # noqa: E402


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=64, help="documents per task")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument(
        "--torch_threads", type=int, default=0,
        help="PyTorch's intra-op threads (0: its default); 1 on a loaded CPU, where its "
        "threads otherwise wait on each other",
    )  # fmt: skip
    return parser.parse_args()


METHODS = ("loglikelihood", "loglikelihood_rolling", "generate_until")


def timed(lm) -> dict[str, list[float]]:
    """Wraps the LM's request methods: method -> [seconds, requests], added up."""
    spent = {name: [0.0, 0] for name in METHODS}

    def timing(name, method):
        def wrapped(requests, *args, **kwargs):
            start = time.perf_counter()
            out = method(requests, *args, **kwargs)
            spent[name][0] += time.perf_counter() - start
            spent[name][1] += len(requests)
            return out

        return wrapped

    for name in METHODS:
        setattr(lm, name, timing(name, getattr(lm, name)))
    return spent


def run_tasks(lm, spent: dict[str, list[float]], task_dir: Path) -> dict[str, float]:
    """Requests/s of one simple_evaluate over the tasks, per method and in all."""
    for name in METHODS:
        spent[name] = [0.0, 0]
    manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    simple_evaluate(model=lm, tasks=list(TASKS), task_manager=manager, bootstrap_iters=0)
    rates = {name: round(count / seconds, 2) for name, (seconds, count) in spent.items()}
    seconds, count = (sum(column) for column in zip(*spent.values(), strict=True))
    return {"all": round(count / seconds, 2), **rates}


def main() -> None:
    args = parse()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    logging.disable(logging.WARNING)  # lm-eval's per-metric notes on every task load
    result = {}
    with tempfile.TemporaryDirectory() as root:
        model_dir, task_dir = Path(root) / "model", Path(root) / "tasks"
        model_dir.mkdir()
        task_dir.mkdir()
        save_model(model_dir, hidden=args.hidden, layers=args.layers)
        write_tasks(task_dir, docs=args.docs)
        backends = {
            "hf": lambda: HFLM(
                pretrained=str(model_dir), batch_size=args.batch_size, device="cpu",
                dtype="float32",
            ),
            "sft_jax": lambda: SftJaxLM(str(model_dir), batch_size=args.batch_size),
        }  # fmt: skip
        for name, make in backends.items():
            lm = make()
            spent = timed(lm)
            for run in ("first", "second"):
                result[f"{name}_{run}_requests_per_s"] = run_tasks(lm, spent, task_dir)
            result["requests"] = {method: count for method, (_, count) in spent.items()}
    ours, theirs = result["sft_jax_second_requests_per_s"], result["hf_second_requests_per_s"]
    result["sft_jax_over_hf"] = {k: round(ours[k] / theirs[k], 3) for k in ours}
    print(f"sft_jax / hf requests/s (second runs): {result['sft_jax_over_hf']}")
    print(json.dumps({**vars(args), **result}))


if __name__ == "__main__":
    main()
