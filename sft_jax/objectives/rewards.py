"""Verifiable rewards for online RL: the functions that score a step's completions.

A reward function has TRL's signature,

  f(prompts, completions, completion_ids, **columns) -> list[float | None]

one value per completion (None: the function does not apply to it); `completions` are the
completion texts, `columns` the prompt dataset's other fields, one value per completion (a
`solution` or `answer` column, say). Functions are named in the config by a built-in name
(BUILTINS) or as "package.module:function" (any importable callable; a module of your own
next to your config works). Several run at once with weights; `score` calls them all and
checks what they return.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import numbers
import re
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sft_jax.core.errors import ConfigError, UserError
from sft_jax.core.registry import Registry
from sft_jax.objectives import model_reward

RewardFn = Callable[..., list]


class RewardError(UserError):
    """A reward function failed or returned something unusable; the message names it."""


@dataclasses.dataclass(frozen=True)
class Reward:
    name: str  # as the config names it; metrics are rewards/<name>/mean and /std
    fn: RewardFn
    weight: float = 1.0


def completion_text(completion: Any) -> str:
    """A completion's text: itself, or the content of a conversational one's first message
    ([{"role": "assistant", "content": ...}], as TRL passes completions of chat prompts)."""
    if isinstance(completion, str):
        return completion
    return str(completion[0]["content"])


def _reference(columns: dict[str, Sequence[Any]], name: str, count: int) -> Sequence[Any]:
    for key in ("solution", "answer"):
        if key in columns:
            return columns[key]
    raise RewardError(
        f"reward {name!r} compares each completion with the prompt's `solution` (or `answer`) "
        f"field, which the prompt data lacks (its fields: {', '.join(sorted(columns)) or 'none'}"
        f"; {count} completions)."
    )


def math_reward(prompts, completions, completion_ids, **columns) -> list[float | None]:
    """1.0 where the completion's answer (the first \\boxed{} or LaTeX expression, else the
    first plain expression such as "52" or "3/4") equals the solution by value (math-verify),
    else 0.0; None where the solution does not parse. A conversational completion (a message
    list, as TRL passes them) is scored by its first message's content."""
    try:
        from latex2sympy2_extended import NormalizationConfig
        from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
    except ImportError as e:
        raise RewardError(
            "reward 'math' needs the math-verify package: pip install math-verify"
        ) from e
    # math-verify's timeouts use signal.alarm, which only the main thread may set.
    main = threading.current_thread() is threading.main_thread()
    timeout = {"parsing_timeout": 10 if main else None}
    extract = [
        LatexExtractionConfig(
            normalization_config=NormalizationConfig(units=True),
            boxed_match_priority=0,
            try_extract_without_anchor=False,
        ),
        ExprExtractionConfig(),
    ]
    out: list[float | None] = []
    solutions = _reference(columns, "math", len(completions))
    for text, solution in zip(map(completion_text, completions), solutions, strict=True):
        gold = parse(str(solution), **timeout)
        if not gold:
            out.append(None)
            continue
        answer = parse(text, extraction_config=extract, extraction_mode="first_match", **timeout)
        out.append(float(verify(gold, answer, timeout_seconds=5 if main else None)))
    return out


def exact_match_reward(prompts, completions, completion_ids, **columns) -> list[float]:
    """1.0 where the completion, stripped, is the answer (or solution) stripped, else 0.0."""
    answers = _reference(columns, "exact_match", len(completions))
    return [
        float(text.strip() == str(answer).strip())
        for text, answer in zip(map(completion_text, completions), answers, strict=True)
    ]


_THINK = re.compile(r"^<think>(?!.*<think>)(.*?)</think>.*$", re.DOTALL)


def think_format_reward(prompts, completions, completion_ids, **columns) -> list[float]:
    """1.0 where the completion opens with one <think>...</think> block (TRL's
    think_format_reward), else 0.0."""
    return [1.0 if _THINK.match(completion_text(c)) else 0.0 for c in completions]


@dataclasses.dataclass(frozen=True)
class SoftOverlongPunishment:
    """DAPO's length penalty (its Eq. 13, TRL's get_soft_overlong_punishment): 0 up to
    max_length - cache tokens, then falling linearly to -1 at max_length, -1 beyond."""

    max_length: int
    cache: int

    def __call__(self, prompts, completions, completion_ids, **columns) -> list[float]:
        start = self.max_length - self.cache
        out = []
        for ids in completion_ids:
            length = len(ids)
            if length <= start:
                out.append(0.0)
            elif length <= self.max_length:
                out.append((start - length) / self.cache)
            else:
                out.append(-1.0)
        return out


BUILTINS: Registry[Callable[[int], RewardFn]] = Registry("reward function")
BUILTINS.register("math", lambda max_length: math_reward)
BUILTINS.register("exact_match", lambda max_length: exact_match_reward)
BUILTINS.register("think_format", lambda max_length: think_format_reward)
BUILTINS.register(
    "overlong", lambda max_length: SoftOverlongPunishment(max_length, max(max_length // 4, 1))
)


MODEL_PREFIX = model_reward.PREFIX  # a reward model's export


def load(name: str, max_completion_length: int, models: bool = True) -> RewardFn | None:
    """A built-in by name, a reward model's export as "reward_model:DIR" (models=False: only
    checked, None), or the callable "package.module:function" names."""
    if name in BUILTINS.entries:
        return BUILTINS.entries[name](max_completion_length)
    if name.startswith(MODEL_PREFIX):
        directory = name.removeprefix(MODEL_PREFIX)
        if models:
            return model_reward.ModelReward(directory)
        model_reward.check(directory)
        return None
    module_name, _, attribute = name.partition(":")
    if not attribute:
        raise ConfigError(
            f"reward {name!r}: neither a built-in ({', '.join(BUILTINS.names())}) nor "
            "'package.module:function'."
        )
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or the module's own error while importing
        raise ConfigError(
            f"reward {name!r}: module {module_name!r} does not import ({type(e).__name__}: {e}); "
            "it must be importable from where the run starts (on PYTHONPATH)."
        ) from e
    fn = getattr(module, attribute, None)
    if not callable(fn):
        raise ConfigError(f"reward {name!r}: {module_name} has no function {attribute!r}.")
    return fn


def rewards_from_config(
    names: str, weights: str, max_completion_length: int, models: bool = True
) -> list[Reward]:
    """The rewards of comma-separated names and weights ("" weights: 1.0 each); models=False
    checks reward models' exports without loading them (their functions are then None)."""
    listed = [n.strip() for n in names.split(",") if n.strip()]
    if not listed:
        raise ConfigError("grpo.reward_funcs is empty: name at least one reward function.")
    values = [float(w) for w in weights.split(",") if w.strip()] if weights else []
    if values and len(values) != len(listed):
        raise ConfigError(
            f"grpo.reward_weights has {len(values)} weights for {len(listed)} reward functions "
            f"({', '.join(listed)}): give one weight each, or none (1.0 each)."
        )
    values = values or [1.0] * len(listed)
    return [
        Reward(_metric_name(n), load(n, max_completion_length, models), w)
        for n, w in zip(listed, values, strict=True)
    ]


def _metric_name(name: str) -> str:
    """The name in rewards/<name>/mean: a reward model's by its folder (no slashes)."""
    if name.startswith(MODEL_PREFIX):
        return MODEL_PREFIX + Path(name.removeprefix(MODEL_PREFIX).rstrip("/")).name
    return name


def score(
    rewards: Sequence[Reward],
    prompts: Sequence[Any],
    completions: Sequence[str],
    completion_ids: Sequence[Sequence[int]],
    columns: dict[str, Sequence[Any]],
) -> np.ndarray:
    """[N, F] rewards of N completions by F functions, NaN where a function returned None; a
    function that raises, returns a list of another length, or a value that is not a finite
    number stops the run with a RewardError naming it and the prompt."""
    count = len(completions)
    table = np.full((count, len(rewards)), np.nan)
    for column, reward in enumerate(rewards):
        try:
            values = reward.fn(
                prompts=list(prompts),
                completions=list(completions),
                completion_ids=[list(ids) for ids in completion_ids],
                **columns,
            )
        except RewardError:
            raise
        except Exception as e:
            raise RewardError(
                f"reward {reward.name!r} raised {type(e).__name__}: {e} (scoring {count} "
                f"completions; the first prompt: {_short(prompts[0])})."
            ) from e
        if not isinstance(values, (list, tuple)) or len(values) != count:
            got = len(values) if isinstance(values, (list, tuple)) else type(values).__name__
            raise RewardError(
                f"reward {reward.name!r} returned {got} values for {count} completions: it must "
                "return a list with one float (or None) per completion."
            )
        for row, value in enumerate(values):
            if value is None:
                continue
            if not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise RewardError(
                    f"reward {reward.name!r} returned {value!r} for completion {row} (prompt: "
                    f"{_short(prompts[row])}): rewards are finite numbers, or None where the "
                    "function does not apply."
                )
            table[row, column] = float(value)
    return table


def _short(prompt: Any, limit: int = 120) -> str:
    text = prompt if isinstance(prompt, str) else repr(prompt)
    return repr(text if len(text) <= limit else text[:limit] + "...")
