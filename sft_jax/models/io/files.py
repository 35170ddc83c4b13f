"""Model directories: a local path or a hub id (safetensors only), and its config.json."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import transformers

from sft_jax.core.errors import CheckpointError

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]


def resolve_model_dir(name_or_path: str | Path) -> Path:
    """A local directory as is; otherwise a hub id fetched (safetensors only) into the hub cache."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists() or str(name_or_path).startswith((".", "/", "~")):
        raise CheckpointError(f"{name_or_path}: not a model directory.")
    import huggingface_hub

    try:
        return Path(
            huggingface_hub.snapshot_download(str(name_or_path), allow_patterns=_HUB_PATTERNS)
        )
    except Exception as e:  # network, auth, unknown repo: say so in one line
        raise CheckpointError(
            f"{name_or_path}: not a local directory, and fetching it from the Hugging Face hub "
            f"failed ({type(e).__name__}: {e}). Pass a local path or check network/auth."
        ) from e


def check_safetensors_present(model_dir: Path) -> None:
    if any(model_dir.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in model_dir.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{model_dir}: holds only pickle checkpoints ({', '.join(pickles)}), which can run "
            "arbitrary code when loaded and are refused. Convert them to safetensors first "
            "(e.g. load once with transformers and save_pretrained, which writes safetensors)."
        )
    raise CheckpointError(f"{model_dir}: no *.safetensors weights found.")


# Image-text checkpoints read as their text model here (text_config; their tensors by
# fixed_names.text_model_tensors): the published Qwen3.5 checkpoints.
_TEXT_MODEL_OF = ("qwen3_5", "qwen3_5_moe")


def load_hf_config(model_dir: Path) -> Any:
    """config.json as transformers reads it; of a multimodal Qwen3.5 checkpoint, its text
    model's."""
    if not (model_dir / "config.json").exists():
        raise CheckpointError(f"{model_dir}: config.json is missing.")
    config = transformers.AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    return config.text_config if config.model_type in _TEXT_MODEL_OF else config
