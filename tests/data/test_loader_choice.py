"""config.data.loader="auto": memory for data that fits, streamed above the threshold, a resumed
run on the loader it was trained with; each choice logged with its reason."""

from __future__ import annotations

import logging
import os

import pytest
from chat_tokenizers import make_tokenizer
from test_data import base_config, conversation, write_jsonl
from test_trainer import base_config as train_config
from test_trainer import synthetic_source

from sft_jax.core.spec import RunSpec
from sft_jax.data import loader_choice
from sft_jax.data.batches import TrainBatches
from sft_jax.data.stream import StreamBatches
from sft_jax.loop import trainer
from sft_jax.train.setup import open_run_data, with_loader


@pytest.fixture
def auto_config(tmp_path):
    """30 chats (~3 KB) with a ChatML tokenizer, loader="auto", caches in tmp_path."""
    make_tokenizer("chatml").save_pretrained(tmp_path / "tokenizer")
    write_jsonl(tmp_path / "train.jsonl", [conversation(i) for i in range(30)])
    config = base_config()
    config.data.update(tokenizer=str(tmp_path / "tokenizer"), eval_files="", loader="auto",
                       train_files=str(tmp_path / "train.jsonl"), max_length=64,
                       cache_dir=str(tmp_path / "cache"), num_workers=1)  # fmt: skip
    return config


def _choice_logged(config, caplog):
    """The train rows' loader class and the line that says why."""
    with caplog.at_level(logging.INFO, logger="sft_jax.data.loader_choice"):
        source = open_run_data(RunSpec.of(config))
    (line,) = [r.getMessage() for r in caplog.records if "loader='auto'" in r.getMessage()]
    return type(source.train_batches), line


def test_auto_keeps_data_under_the_threshold_in_memory(auto_config, caplog):
    held = os.path.getsize(auto_config.data.train_files) / 2**20
    loader, line = _choice_logged(auto_config, caplog)
    assert loader is TrainBatches
    assert line == (f"config.data.loader='auto': 'memory' (the training files hold {held:.1f} "
                    "MiB, at most 256.0 MiB)")  # fmt: skip


def test_auto_streams_data_over_the_threshold(auto_config, monkeypatch, caplog):
    held = os.path.getsize(auto_config.data.train_files)
    monkeypatch.setattr(loader_choice, "STREAM_ABOVE_BYTES", held - 1)
    loader, line = _choice_logged(auto_config, caplog)
    assert loader is StreamBatches
    assert line.startswith("config.data.loader='auto': 'stream' (the training files hold ")
    assert held > loader_choice.STREAM_ABOVE_BYTES and ", over " in line


@pytest.mark.parametrize(
    ("change", "loader"),
    [
        ({"data.eval_fraction": 0.1}, "memory"),  # the stream loader does not split eval off
        ({"prompt.method": "prompt_tuning"}, "memory"),  # virtual tokens in in-memory rows
        ({"data.contamination": "report"}, "stream"),
        ({"data.loader": "memory"}, "memory"),  # explicit values stay
        ({"data.loader": "stream", "data.eval_fraction": 0.0}, "stream"),
    ],
)
def test_auto_follows_what_each_loader_can_do(auto_config, monkeypatch, change, loader):
    monkeypatch.setattr(loader_choice, "STREAM_ABOVE_BYTES", 0)  # every size: over
    spec = RunSpec.of(auto_config).with_values(change)
    assert with_loader(spec).data.loader == loader


@pytest.mark.parametrize(
    ("saved", "loader"),
    [
        ({"data": {"loader": "memory"}}, "memory"),
        ({"data": {}}, "memory"),  # saved before the field existed: the in-memory loader
        ({"data": {"loader": "stream"}}, "stream"),
        ({"data": {"loader": "auto"}}, "stream"),  # chosen again, from the same data
    ],
)
def test_auto_resumes_on_the_loader_of_the_checkpoint(auto_config, monkeypatch, saved, loader):
    monkeypatch.setattr(loader_choice, "STREAM_ABOVE_BYTES", 0)
    assert with_loader(RunSpec.of(auto_config), saved).data.loader == loader


@pytest.fixture(scope="module")
def model_dir(hf_checkpoint):
    return hf_checkpoint("llama3.1")[0]


@pytest.mark.e2e
def test_a_run_saved_with_the_old_default_resumes_in_memory(model_dir, tmp_path, monkeypatch):
    """Trained 2 steps with loader="memory" (the old default), resumed with "auto" where the
    data is over the threshold: the data factory gets "memory", as the checkpoint's data
    position needs (the stream loader would refuse it)."""
    monkeypatch.setattr(loader_choice, "STREAM_ABOVE_BYTES", 0)
    config = train_config(model_dir, steps=2)
    config.checkpoint.update(enabled=True, every_steps=2)
    config.eval.update(every_steps=0, at_start=False)
    loaders = []

    def factory(spec, feed):
        loaders.append(spec.data.loader)
        return synthetic_source()

    config.data.loader = "memory"
    trainer.run(config, tmp_path, factory)
    config.data.loader, config.train.steps = "auto", 3
    resumed = trainer.run(config, tmp_path, factory)
    assert resumed["start_step"] == 2 and loaders == ["memory", "memory"]
    assert with_loader(RunSpec.of(config)).data.loader == "stream"  # a new WORKDIR's choice
