"""Names the mistyped field of a --config.a.b=value override, with the closest real ones."""

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


def check_values(config: Any, device_count: int, batch_shards: int) -> None:
    """Values that would fail deep inside (or silently) later, named now with what to do.

    batch_shards: devices the batch rows are split over (mesh data x fsdp).
    """
    from sft_jax.errors import ConfigError

    def need(ok: bool, field: str, problem: str) -> None:
        if not ok:
            raise ConfigError(f"config.{field}={_get(config, field)!r}: {problem}")

    train, lora = config.train, config.lora
    need(train.steps > 0, "train.steps", "train for at least one step.")
    need(train.learning_rate > 0, "train.learning_rate", "must be positive.")
    need(train.warmup_steps >= 0, "train.warmup_steps", "must be 0 or more.")
    need(0 <= train.min_lr_ratio <= 1, "train.min_lr_ratio", "must be within [0, 1].")
    need(train.max_grad_norm >= 0, "train.max_grad_norm", "must be 0 (off) or positive.")
    need(train.loss_chunk_size > 0, "train.loss_chunk_size", "must be positive.")
    need(config.data.max_length > 1, "data.max_length", "rows need at least 2 tokens.")
    need(config.log.every_steps > 0, "log.every_steps", "log at least every N > 0 steps.")
    need(config.data.prefetch >= 1, "data.prefetch", "prefetch at least 1 batch.")
    need(
        config.model.remat in ("none", "save_matmuls", "full", "auto"),
        "model.remat",
        "expected 'none', 'save_matmuls', 'full' or 'auto'.",
    )
    need(
        config.data.max_documents_per_row >= 0,
        "data.max_documents_per_row",
        "must be 0 (no limit) or positive.",
    )
    accumulation = train.gradient_accumulation_steps
    need(accumulation > 0, "train.gradient_accumulation_steps", "must be 1 or more.")
    for field, pieces in (("train.global_batch_size", accumulation),
                          ("eval.global_batch_size", 1)):  # fmt: skip
        rows = _get(config, field)
        split = f"{pieces} micro-batches x " if pieces > 1 else ""
        need(
            rows > 0 and rows % (pieces * batch_shards) == 0,
            field,
            f"rows must split evenly into {split}{batch_shards} devices (the mesh's data x fsdp "
            f"axes, of {device_count} devices): use a multiple of {pieces * batch_shards}.",
        )
    for field in ("eval.every_steps", "checkpoint.every_steps", "eval.generate_examples",
                  "eval.show_samples", "eval.early_stopping_patience"):  # fmt: skip
        need(_get(config, field) >= 0, field, "must be 0 (off) or positive.")
    need(config.eval.max_new_tokens > 0, "eval.max_new_tokens", "must be positive.")
    need(config.checkpoint.keep_last >= 1, "checkpoint.keep_last", "keep at least 1.")
    need(
        config.export.at_end in ("best", "last", "none"),
        "export.at_end",
        "expected 'best', 'last' or 'none'.",
    )
    need(
        config.checkpoint.enabled or config.export.at_end == "none",
        "export.at_end",
        "the export is written from a checkpoint, but config.checkpoint.enabled is False: "
        "enable checkpoints or set config.export.at_end='none'.",
    )
    need(lora.rank >= 0, "lora.rank", "0 (full fine-tuning) or a positive adapter rank.")
    if lora.rank:
        need(0 <= lora.dropout < 1, "lora.dropout", "must be within [0, 1).")
        need(lora.alpha > 0, "lora.alpha", "must be positive.")
        need(
            any(name.strip() for name in lora.target_modules.split(",")),
            "lora.target_modules",
            "no module to adapt: with lora.rank > 0 nothing would train. Name projections "
            "(q_proj, ..., down_proj) or use 'all-linear'.",
        )
    if lora.quantize:
        need(lora.quantize in ("nf4", "int8"), "lora.quantize", "expected 'nf4', 'int8' or ''.")
        block = lora.quant_block_size
        need(
            block > 0 and block % 2 == 0,
            "lora.quant_block_size",
            "weights per scale: a positive even number (64 is the QLoRA default).",
        )


def _get(config: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        config = config[part]
    return config
