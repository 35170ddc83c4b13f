"""Errors that reach the user as one clear message (main.py prints them without a traceback)."""

from typing import Any


class UserError(ValueError):
    """A problem with the user's config, data or model files: one message, no traceback."""


class ConfigError(UserError):
    """A config value cannot work; the message names the field and what to use instead."""


class UsageError(UserError):
    """A command was called with flags that do not go together."""


class CheckpointError(UserError):
    """A model directory or a run's checkpoint cannot be read or written; the message says which
    file and what to do."""


class TrainingDivergedError(RuntimeError):
    """The loss or gradient norm stopped being finite (nothing of that step is saved)."""


def check_choice(field: str, value: object, choices: tuple[object, ...]) -> None:
    """The one wording of "this field takes one of these values" (config_check uses it for
    every such field; functions that take the value directly use it too)."""
    if value not in choices:
        raise ConfigError(
            f"config.{field}={value!r}: expected one of {', '.join(map(str, choices))}."
        )


def value_at(config: Any, field: str) -> Any:
    """The value of a dotted config field, e.g. value_at(spec, "train.steps")."""
    for part in field.split("."):
        config = getattr(config, part)
    return config


def need(config: Any, ok: bool, field: str, problem: str) -> None:
    """The one wording of "this config field cannot be this value": config.FIELD=VALUE: why."""
    if not ok:
        raise ConfigError(f"config.{field}={value_at(config, field)!r}: {problem}")
