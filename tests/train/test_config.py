"""The config: every field documented, mistyped overrides named, presets load."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from sft_jax.core.spec import RunSpec

REPO = Path(__file__).resolve().parents[2]


def test_every_field_of_the_base_config_is_documented():
    lines = (REPO / "configs" / "base.py").read_text().splitlines()
    undocumented = []
    for index, line in enumerate(lines):
        if not re.match(r"\s+config\.\w+\.\w+ = ", line):
            continue
        has_comment = "#" in line or lines[index - 1].strip().startswith("#")
        # A field may share the comment of the group it sits in (e.g. adam_b1 / adam_b2).
        in_group = re.match(r"\s+config\.\w+\.\w+ = ", lines[index - 1])
        if not (has_comment or in_group):
            undocumented.append(line.strip())
    assert not undocumented, undocumented


def run_main(workdir, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "main.py", "--config=configs/base.py", f"--workdir={workdir}",
         *overrides],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


@pytest.mark.e2e
def test_a_mistyped_override_is_named_with_suggestions(tmp_path):
    result = run_main(tmp_path, "--config.train.learning_rat=1e-4")
    assert result.returncode != 0
    assert "--config.train.learning_rat: train has no field 'learning_rat'. Did you mean " \
           "learning_rate?" in result.stderr  # fmt: skip
    assert "Traceback" not in result.stderr


def test_presets_load_and_change_only_existing_fields():
    sys.path.insert(0, str(REPO))
    import importlib

    from sft_jax.train.config_check import check_values

    base = importlib.import_module("configs.base").get_config()
    presets = sorted(
        p.stem for p in (REPO / "configs").glob("*.py") if p.stem not in ("base", "__init__")
    )
    assert len(presets) >= 4
    for name in presets:
        module = importlib.import_module(f"configs.{name}")
        config = module.get_config()  # a locked config: a field base lacks would raise here
        assert "python main.py --config=configs/" + name + ".py" in module.__doc__
        assert config.model.name_or_path != base.model.name_or_path
        assert set(config.keys()) == set(base.keys())
        check_values(RunSpec.of(config), 1, 1)  # runs as shipped on one GPU


BAD_VALUES = [
    ("train.steps", 0, "train for at least one step"),
    ("train.gradient_accumulation_steps", 0, "must be 1 or more"),
    ("train.global_batch_size", 12, "split evenly into 8 devices"),
    ("train.loss_chunk_size", 0, "must be positive"),
    ("eval.global_batch_size", 4, "use a multiple of 8"),
    ("log.every_steps", 0, "log at least every N > 0 steps"),
    ("model.remat", "selective", "expected 'none', 'save_matmuls', 'offload', 'full' or 'auto'"),
    ("data.max_documents_per_row", -1, "must be 0 (no limit) or positive"),
    ("export.at_end", "bset", "expected 'best', 'last' or 'none'"),
    ("checkpoint.keep_last", 0, "keep at least 1"),
    ("lora.rank", -4, "a positive adapter rank"),
    ("lora.quant_block_size", 0, "a positive even number"),
]


def test_values_that_would_fail_later_are_named_up_front():
    sys.path.insert(0, str(REPO))
    import ml_collections
    import pytest

    from configs import base
    from sft_jax.core.errors import ConfigError
    from sft_jax.train.config_check import check_values

    check_values(RunSpec.of(base.get_config()), 8, 8)  # the defaults pass
    for field, value, message in BAD_VALUES:
        config = ml_collections.ConfigDict(base.get_config().to_dict())
        section, name = field.split(".")
        config[section][name] = value
        if field.startswith("lora.quant"):
            config.lora.rank, config.lora.quantize = 8, "nf4"
        with pytest.raises(ConfigError, match=f"config.{field}={value!r}: .*{re.escape(message)}"):
            check_values(RunSpec.of(config), 8, 8)
    # Accumulation splits the batch too: 32 rows = 4 micro-batches x 8 devices, but not 3.
    config = ml_collections.ConfigDict(base.get_config().to_dict())
    config.train.gradient_accumulation_steps = 3
    with pytest.raises(ConfigError, match="3 micro-batches x 8 devices"):
        check_values(RunSpec.of(config), 8, 8)
    # LoRA that adapts nothing, and an export that would have no checkpoint to come from.
    config = ml_collections.ConfigDict(base.get_config().to_dict())
    config.lora.rank, config.lora.target_modules = 8, " , "
    with pytest.raises(ConfigError, match="nothing would train"):
        check_values(RunSpec.of(config), 8, 8)
    config = ml_collections.ConfigDict(base.get_config().to_dict())
    config.checkpoint.enabled = False
    with pytest.raises(
        ConfigError, match=re.escape("enable checkpoints or set config.export.at_end='none'")
    ):
        check_values(RunSpec.of(config), 8, 8)


@pytest.mark.e2e
def test_a_bad_value_stops_main_with_one_line(tmp_path):
    result = run_main(tmp_path, "--config.log.every_steps=0")
    assert result.returncode != 0
    assert "error: config.log.every_steps=0: log at least every N > 0 steps." in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "checkpoints").exists()
