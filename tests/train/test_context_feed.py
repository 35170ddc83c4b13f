"""The trainer's feed when a context axis spans processes: every process of a data-parallel
group feeds the same rows and its devices take their slices of the sequence."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from sft_jax.core.errors import ConfigError
from sft_jax.train import sharding
from sft_jax.train.sharding import row_blocks

REPO = Path(__file__).resolve().parents[2]
STEPS = 3


def start_demo(workdir: Path, train_file: Path, devices: int, process: int = 0,
               processes: int = 1, port: int = 0) -> subprocess.Popen:  # fmt: skip
    """main.py on the demo config, shortened: mesh.context=4 over `processes` processes of
    `devices` CPU devices each, 64-token rows, 2 rows a batch, a loss logged every step."""
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")  # fmt: skip
    distributed = [
        f"--config.distributed.coordinator_address=127.0.0.1:{port}",
        f"--config.distributed.num_processes={processes}",
        f"--config.distributed.process_id={process}",
        "--config.distributed.cpu_collectives=gloo",
    ]  # fmt: skip
    return subprocess.Popen(
        [sys.executable, "main.py", "--config=configs/base.py", f"--workdir={workdir}",
         "--config.mesh.context=4", "--config.mesh.fsdp=1", "--config.data.max_length=64",
         f"--config.data.train_files={train_file}", "--config.data.eval_max_examples=4",
         "--config.data.cache_dir=none", "--config.data.num_workers=1",
         "--config.train.global_batch_size=2", "--config.eval.global_batch_size=2",
         f"--config.train.steps={STEPS}", "--config.train.warmup_steps=1",
         "--config.log.every_steps=1", "--config.eval.at_start=False",
         "--config.eval.generate_examples=0", "--config.eval.show_samples=0",
         "--config.checkpoint.enabled=False", "--config.export.at_end=none",
         *(distributed if processes > 1 else [])],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def finish(process: subprocess.Popen) -> None:
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-4000:]


def logged(process: subprocess.Popen, workdir: Path) -> dict[int, dict]:
    finish(process)
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    merged: dict[int, dict] = {}
    for record in records:  # a step's train and eval metrics may be separate records
        merged.setdefault(record["step"], {}).update(record)
    return merged


@pytest.mark.e2e
def test_context_axis_across_two_processes_trains_as_one_process(tmp_path):
    """main.py with mesh.context=4 over 2 processes x 2 CPU devices (jax.distributed on
    loopback, gloo): both processes feed the same rows, each device its quarter of every row;
    the train losses and the eval loss equal one process with 4 devices."""
    train_file = tmp_path / "train.jsonl"
    lines = (REPO / "assets" / "demo_data" / "train.jsonl").read_text().splitlines()[:64]
    train_file.write_text("\n".join(lines) + "\n")
    with socket.socket() as probe:  # a free port for the coordinator
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    runs = {name: tmp_path / name for name in ("one", "p0", "p1")}
    one = start_demo(runs["one"], train_file, devices=4)
    two = [start_demo(runs[f"p{p}"], train_file, 2, p, 2, port) for p in range(2)]
    reference, spanned = logged(one, runs["one"]), logged(two[0], runs["p0"])
    finish(two[1])  # process 1 writes no metrics
    losses = [reference[s]["train/loss"] for s in range(1, STEPS + 1)]
    assert losses[-1] != losses[0]  # the steps trained
    assert [spanned[s]["train/loss"] for s in range(1, STEPS + 1)] == pytest.approx(
        losses, rel=1e-5
    )
    assert spanned[STEPS]["eval/loss"] == pytest.approx(reference[STEPS]["eval/loss"], rel=1e-5)


def test_device_batch_gives_each_device_its_rows_and_its_slice_of_the_sequence():
    """fsdp=2 x context=4 in one process: the process feeds every row (block 0 of 1); each
    device holds its row and its contiguous quarter of the sequence (step.context_layout
    reorders on the devices)."""
    mesh = sharding.make_mesh(1, 2, context=4, devices=jax.devices()[:8])
    assert sharding.row_feed(mesh) == (0, 1)
    ids = np.arange(2 * 16).reshape(2, 16)
    batch = sharding.device_batch({"input_ids": ids}, sharding.batch_shardings(mesh, ["input_ids"]))
    placed = batch["input_ids"]
    np.testing.assert_array_equal(np.asarray(placed), ids)
    for shard in placed.addressable_shards:
        rows, time = shard.index
        assert shard.data.shape == (1, 4)
        np.testing.assert_array_equal(np.asarray(shard.data), ids[rows, time])


def test_a_feed_of_other_rows_than_the_mesh_asks_is_a_config_error():
    mesh = sharding.make_mesh(1, 2, context=4, devices=jax.devices()[:8])
    shardings = sharding.batch_shardings(mesh, ["input_ids"])
    with pytest.raises(ConfigError, match=r"fed 1 rows of a 2-row batch.*data_factory"):
        sharding.device_batch({"input_ids": np.zeros((1, 16))}, shardings, global_rows=2)


def test_row_blocks_give_a_data_parallel_group_one_block():
    mesh = {"data": 2, "context": 4}
    # context=4 over processes of 2 devices: processes 0, 1 hold row shard 0, processes 2, 3
    # row shard 1.
    assert row_blocks({0: {0}, 1: {0}, 2: {1}, 3: {1}}, 2, mesh) == [(0,), (1,)]
    # context=2 inside processes of 4 devices: each process holds 2 row shards of its own.
    assert row_blocks({0: {0, 1}, 1: {2, 3}}, 4, mesh) == [(0, 1), (2, 3)]


@pytest.mark.parametrize(
    "holds",
    [
        {0: {0}, 1: {0, 1}, 2: {1}},  # context=6 over processes of 4 devices: shared in part
        {0: {0, 2}, 1: {1, 3}},  # rows interleaved over the processes
    ],
)
def test_row_blocks_refuse_what_no_process_can_feed_whole(holds):
    with pytest.raises(ConfigError, match=r"config\.mesh\.context x config\.mesh\.tensor"):
        row_blocks(holds, 1 + max(max(h) for h in holds.values()), {"context": 6})
