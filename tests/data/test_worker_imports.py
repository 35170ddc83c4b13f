"""Tokenizer worker processes stay light: a spawned worker imports what tokenizing needs (the
tokenizer, templates, spans, formats), never JAX or flax (~200 MB a process), and the entry
points a spawned worker runs again as __mp_main__ import neither."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from chat_tokenizers import make_tokenizer
from import_probe import HEAVY, ImportProbe
from test_data import base_config, conversation, write_jsonl

from sft_jax.core.spec import RunSpec
from sft_jax.data.mixture import prepared

REPO = Path(__file__).resolve().parents[2]


def test_spawned_workers_tokenize_without_jax_and_write_the_same_store(tmp_path):
    """Two spawned workers tokenize 600 chats (3 chunks) into the store: neither process holds
    a module of jax, flax, optax, orbax or torch when it tokenizes, and the store's tokens,
    trained flags, offsets and stats equal those of tokenizing in this process."""
    write_jsonl(tmp_path / "train.jsonl", [conversation(i) for i in range(600)])
    config = base_config()
    train_file = str(tmp_path / "train.jsonl")
    config.data.update(train_files=train_file, eval_files="", max_length=64, loader="stream")
    data = RunSpec.of(config).data
    tokenizer = make_tokenizer("chatml")
    probes = tmp_path / "probes"
    probes.mkdir()
    stores = {}
    for workers in (1, 2):
        cache_dir = str(tmp_path / f"stores{workers}")
        spec = dataclasses.replace(data, num_workers=workers, cache_dir=cache_dir)
        used = tokenizer if workers == 1 else ImportProbe(tokenizer, str(probes))
        stores[workers], _ = prepared(spec.train_files, "train", "f", used, spec)
    seen = {int(p.stem): json.loads(p.read_text()) for p in probes.glob("*.json")}
    assert seen and os.getpid() not in seen, seen  # the workers tokenized, not this process
    assert all(modules == [] for modules in seen.values()), seen
    single, spawned = stores[1], stores[2]
    assert len(single) == len(spawned) == 600
    for field in ("tokens", "trained", "offsets"):
        np.testing.assert_array_equal(getattr(spawned, field), getattr(single, field))
    assert spawned.stats == single.stats


def test_entry_points_import_no_jax_when_a_worker_runs_them_again():
    """A spawned worker runs the parent's __main__ again as __mp_main__ (main.py by path, the
    -m commands by name): none of them imports a heavy module at the top."""
    code = (
        "import runpy, sys\n"
        "runpy.run_path('main.py', run_name='__mp_main__')\n"
        "for name in ('sft_jax.data.prepare', 'sft_jax.cli.prepare', 'sft_jax.data.inspect',\n"
        "             'sft_jax.cli.inspect'):\n"
        "    runpy.run_module(name, run_name='__mp_main__', alter_sys=True)\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout
