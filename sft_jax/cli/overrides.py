"""The mistyped field of a --config.a.b=value override, named before absl's own error."""

from __future__ import annotations

import difflib
import importlib.util
from pathlib import Path
from typing import Any


def _load(config_arg: str) -> Any:
    path = config_arg.split(":", 1)[0]
    spec = importlib.util.spec_from_file_location("_config_for_check", Path(path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def unknown_override(argv: list[str]) -> str | None:
    """A message for the first --config.* override whose field does not exist, else None."""
    config_args = [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    if not config_args:
        return None
    try:
        config = _load(config_args[-1])
    except Exception:  # the config file itself is broken: let the original error speak
        return None
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        dotted = arg[len("--config.") :].split("=", 1)[0]
        node = config
        for depth, key in enumerate(dotted.split(".")):
            if not hasattr(node, "keys") or key not in node:
                known = sorted(node.keys()) if hasattr(node, "keys") else []
                close = difflib.get_close_matches(key, known, n=3)
                where = ".".join(dotted.split(".")[:depth]) or "the config"
                hint = f" Did you mean {', '.join(close)}?" if close else ""
                return (
                    f"--config.{dotted}: {where} has no field {key!r}.{hint} "
                    f"Fields of {where}: {', '.join(known)}."
                )
            node = node[key]
    return None
