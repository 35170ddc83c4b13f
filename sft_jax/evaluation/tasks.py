"""lm-evaluation-harness tasks on the live model at each eval (config.eval.harness_tasks): their
metrics as harness/<task>/<metric>."""

from __future__ import annotations

import logging
import math
from typing import Any

from sft_jax.core.errors import ConfigError
from sft_jax.core.spec import EvalSpec
from sft_jax.models import CausalLM

log = logging.getLogger(__name__)
_MANAGERS: dict[str, Any] = {}


def task_names(tasks: str) -> list[str]:
    """config.eval.harness_tasks split at commas, blanks dropped."""
    return [name.strip() for name in tasks.split(",") if name.strip()]


def metric_key(task: str, lm_eval_key: str) -> str:
    """harness/<task>/<metric> of lm-eval's "<metric>,<filter>" (the filter joined with an
    underscore unless it is lm-eval's "none")."""
    metric, _, filter_name = lm_eval_key.partition(",")
    suffix = "" if filter_name in ("", "none") else f"_{filter_name}"
    return f"harness/{task}/{metric}{suffix}"


def harness_metrics(model: CausalLM, tokenizer: Any, spec: EvalSpec) -> dict[str, float]:
    """Every numeric metric (stderrs aside) of each task of spec.harness_tasks for `model` as
    it is now (its live, possibly sharded, parameters; LoRA applied unmerged), spec.harness_limit
    documents each, spec.global_batch_size requests at once, replies of up to
    spec.max_new_tokens; {} when it names none (or there is no tokenizer)."""
    names = task_names(spec.harness_tasks)
    if not names or tokenizer is None:
        return {}
    try:
        from lm_eval import simple_evaluate
        from lm_eval.tasks import TaskManager

        from sft_jax.evaluation.harness import SftJaxLM
    except ImportError as e:
        raise ConfigError(
            "config.eval.harness_tasks needs lm-evaluation-harness: pip install "
            "'sft_jax[eval]' (or set it to '')."
        ) from e
    manager = _task_manager(TaskManager, spec.harness_include_path)
    unknown = [name for name in names if not manager.match_tasks([name])]
    if unknown:
        raise ConfigError(
            f"config.eval.harness_tasks: no lm-eval task named {', '.join(unknown)} "
            "(`lm_eval ls tasks` lists them; eval.harness_include_path adds your own)."
        )
    lm = SftJaxLM(
        model, tokenizer, batch_size=spec.global_batch_size, max_gen_toks=spec.max_new_tokens
    )
    limit = spec.harness_limit or None
    results = simple_evaluate(
        model=lm, tasks=names, task_manager=manager, limit=limit, bootstrap_iters=0
    )
    return {
        metric_key(task, key): float(value)
        for task, values in results["results"].items()
        for key, value in values.items()
        if "," in key and "stderr" not in key and _is_number(value)
    }


def _task_manager(task_manager_class: Any, include_path: str) -> Any:
    """One TaskManager per include path for the process: indexing lm-eval's own tasks takes
    seconds, and every eval would repeat it."""
    if include_path not in _MANAGERS:
        _MANAGERS[include_path] = task_manager_class(include_path=include_path or None)
    return _MANAGERS[include_path]


def _is_number(value: Any) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    )
