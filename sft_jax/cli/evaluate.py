"""Evaluate a Hugging Face directory or a training run's checkpoint on lm-evaluation-harness tasks.

python -m sft_jax.evaluate --model=DIR --tasks=hellaswag,gsm8k [--limit=N] [--num_fewshot=K]
    [--batch_size=8] [--output_path=OUT] [--log_samples] [--apply_chat_template]
    [--fewshot_as_multiturn] [--include_path=TASK_DIR] [--dtype=float32|bfloat16]
python -m sft_jax.evaluate --workdir=RUN_DIR [--step=N | --which=best|last] --tasks=...

A run's checkpoint is evaluated as it trained: the run's model with its adapters unmerged
(LoRA, QLoRA, DoRA; a prompt adapter's virtual tokens or key/value prefix), holding the
checkpoint's trained parameters, sharded over the local devices. The model runs as lm-eval's
model type "sft_jax" (sft_jax/evaluation/harness.py). Prints lm-eval's table; with
--output_path writes OUT/results.json and, with --log_samples, OUT/samples_<task>.jsonl.

Over several processes (hosts), each runs the same command with --coordinator_address,
--num_processes and --process_id (SLURM and Cloud TPU pods are detected); the model is sharded
over every process's devices, each process runs every request, process 0 writes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
from absl import app, flags

from sft_jax import cli
from sft_jax.core.errors import UsageError
from sft_jax.core.spec import DistributedSpec
from sft_jax.loop import export
from sft_jax.train import distributed

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "A Hugging Face model directory (or hub id) with a tokenizer.")
flags.DEFINE_string("workdir", None, "Instead of --model: a training run's WORKDIR.")
flags.DEFINE_string("which", "best", "With --workdir: 'best', 'last', or a step number.")
flags.DEFINE_integer("step", None, "With --workdir: the checkpoint step (overrides --which).")
flags.DEFINE_list("tasks", None, "lm-eval task (or group) names, comma-separated.")
flags.DEFINE_string("include_path", None, "A folder of extra lm-eval task YAML files.")
flags.DEFINE_bool(
    "builtin_tasks", True, "Index lm-eval's own tasks (--nobuiltin_tasks: --include_path only)."
)
flags.DEFINE_integer("num_fewshot", None, "Few-shot examples per prompt (default: the task's).")
flags.DEFINE_float("limit", None, "Examples per task (< 1: a fraction); for quick checks only.")
flags.DEFINE_integer("batch_size", 8, "Requests scored or generated at once.")
flags.DEFINE_integer("max_length", None, "Context length in tokens (default: the model's).")
flags.DEFINE_string("output_path", None, "A folder for results.json (and the samples).")
flags.DEFINE_bool("log_samples", False, "With --output_path: every request and response too.")
flags.DEFINE_bool("apply_chat_template", False, "Render prompts with the chat template.")
flags.DEFINE_bool(
    "fewshot_as_multiturn", None, "Few-shot examples as turns (default: with the template)."
)
flags.DEFINE_integer("seed", 0, "Seed of the few-shot draw and of any sampling.")
flags.DEFINE_integer("bootstrap_iters", 100000, "Bootstrap draws of the stderrs (0: none).")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Parameter and compute dtype.")
flags.DEFINE_string(
    "coordinator_address", "", "Several processes: jax.distributed's coordinator, host:port."
)
flags.DEFINE_integer("num_processes", 1, "With --coordinator_address: how many processes.")
flags.DEFINE_integer("process_id", 0, "With --coordinator_address: this process's index.")
flags.DEFINE_string("cpu_collectives", "", "Across CPU-only processes: 'gloo' (or 'mpi').")


def model_to_evaluate(model: str | None, workdir: str | None, which: str | int) -> tuple:
    """(--model's directory, None), or (the run's model with its adapters unmerged, holding its
    checkpoint's trained parameters, and its tokenizer)."""
    if bool(model) == bool(workdir):
        raise UsageError("pass exactly one of --model=DIR and --workdir=RUN_DIR.")
    if model:
        return model, None
    return export.trained_run_model(workdir, which)


def evaluate(model: Any, tasks: list[str], tokenizer: Any = None) -> dict[str, Any]:
    """lm-eval's results (and samples, with --log_samples) of the model (a directory, or a
    loaded model with its tokenizer)."""
    try:
        from lm_eval import simple_evaluate
    except ImportError as e:
        raise UsageError(
            "lm-evaluation-harness is not installed: pip install 'sft_jax[eval]' "
            "(lm-eval>=0.4.13,<0.5)."
        ) from e
    from lm_eval.tasks import TaskManager

    from sft_jax.evaluation.harness import SftJaxLM

    task_manager = TaskManager(
        include_path=FLAGS.include_path, include_defaults=FLAGS.builtin_tasks
    )
    unknown = [t for t in tasks if not task_manager.match_tasks([t])]
    if unknown:
        raise UsageError(
            f"--tasks: no lm-eval task named {', '.join(unknown)} (`lm_eval ls tasks` lists "
            "them; --include_path adds a folder of your own YAML tasks)."
        )
    lm = SftJaxLM(
        model,
        tokenizer,
        batch_size=FLAGS.batch_size,
        max_length=FLAGS.max_length,
        dtype=FLAGS.dtype,
        seed=FLAGS.seed,
    )
    multiturn = FLAGS.fewshot_as_multiturn
    return simple_evaluate(
        model=lm,
        tasks=tasks,
        task_manager=task_manager,
        num_fewshot=FLAGS.num_fewshot,
        limit=FLAGS.limit,
        log_samples=FLAGS.log_samples,
        apply_chat_template=FLAGS.apply_chat_template,
        fewshot_as_multiturn=FLAGS.apply_chat_template if multiturn is None else multiturn,
        bootstrap_iters=FLAGS.bootstrap_iters,
        random_seed=FLAGS.seed,
        numpy_random_seed=FLAGS.seed,
        torch_random_seed=FLAGS.seed,
        fewshot_random_seed=FLAGS.seed,
    )


def write_results(results: dict[str, Any], out: Path) -> None:
    """out/results.json (lm-eval's results, config and versions) and samples_<task>.jsonl."""
    out.mkdir(parents=True, exist_ok=True)
    samples = results.pop("samples", None) or {}
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    for task, rows in samples.items():
        lines = "".join(json.dumps(row, default=str) + "\n" for row in rows)
        (out / f"samples_{task}.jsonl").write_text(lines)


def run(model: str | None, workdir: str | None, which: str | int) -> None:
    """Every process evaluates every request (the model is sharded over all of them: SPMD);
    process 0 prints the table and writes the results."""
    if not FLAGS.tasks:
        raise UsageError("--tasks is required, e.g. --tasks=hellaswag,arc_easy.")
    if FLAGS.log_samples and not FLAGS.output_path:
        raise UsageError("--log_samples writes to --output_path: give one.")
    distributed.initialize(
        DistributedSpec(
            coordinator_address=FLAGS.coordinator_address,
            num_processes=FLAGS.num_processes,
            process_id=FLAGS.process_id,
            cpu_collectives=FLAGS.cpu_collectives,
            force=False,
        )
    )
    loaded, tokenizer = model_to_evaluate(model, workdir, which)
    results = evaluate(loaded, FLAGS.tasks, tokenizer)
    if jax.process_index() != 0:
        return
    from lm_eval.utils import make_table

    print(make_table(results))
    if FLAGS.output_path:
        write_results(results, cli.writable_directory(FLAGS.output_path, "--output_path"))


def main(argv: list[str]) -> None:
    del argv
    which = FLAGS.step if FLAGS.step is not None else FLAGS.which
    cli.run_command(lambda: run(FLAGS.model, FLAGS.workdir, which))


if __name__ == "__main__":
    cli.define_debug_flag()
    app.run(main, flags_parser=lambda argv: cli.parse_flags(argv, lambda argv: None))
