"""The config.json and generation_config.json of an exported model directory."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import transformers


def write_config(out_dir: Path, hf_config: dict[str, Any]) -> None:
    config = transformers.AutoConfig.for_model(**hf_config)
    config.save_pretrained(out_dir)


def write_generation_config(
    out_dir: Path, hf_config: dict[str, Any], source: str | Path | None
) -> None:
    source_file = Path(source) / "generation_config.json" if source else None
    if source_file is not None and source_file.exists():
        shutil.copyfile(source_file, out_dir / "generation_config.json")
        return
    config = transformers.AutoConfig.for_model(**hf_config)
    generation = transformers.GenerationConfig.from_model_config(config)
    (out_dir / "generation_config.json").write_text(
        json.dumps(generation.to_diff_dict(), indent=2, sort_keys=True) + "\n"
    )
