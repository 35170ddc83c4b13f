"""Checkpoints: reshard on restore, damaged ones skipped quietly, last K plus best kept."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from test_step import ROWS, SEQ_LEN, synthetic_batch, tiny_model, train_config

from sft_jax.train import sharding
from sft_jax.train.compiled import build_steps, init_state
from sft_jax.train.optim import make_optimizer
from sft_jax.train.sharding import abstract_like, device_batch
from sft_jax.train.step import StepOptions
from sft_jax.workdir.checkpointing import Checkpoints


def trained_state(mesh, steps: int = 2):
    model = tiny_model()
    tx, schedule = make_optimizer(train_config())
    state, shardings = init_state(model, tx, mesh)
    compiled = build_steps(
        model, tx, schedule, mesh, shardings, train_rows=ROWS, eval_rows=ROWS, seq_len=SEQ_LEN,
        options=StepOptions(loss_chunk_size=4),
    )  # fmt: skip
    for seed in range(steps):
        state, _ = compiled.train(
            state, device_batch(synthetic_batch(seed), compiled.batch_shardings)
        )
    return state, compiled


def test_save_on_fsdp8_restore_on_fsdp2_tensor2_trains_the_same(tmp_path):
    config = train_config()
    fsdp8 = sharding.make_mesh(1, 8, 1)
    state, compiled = trained_state(fsdp8)
    checkpoints = Checkpoints(tmp_path, keep_last=2)
    checkpoints.save(2, state, {"epoch": 0, "position": 16}, config)
    checkpoints.wait()
    next_batch = synthetic_batch(99)
    _, expected = compiled.train(state, device_batch(next_batch, compiled.batch_shardings))

    other = sharding.make_mesh(1, 2, 2, devices=jax.devices()[:4])
    template, other_compiled = trained_state(other, steps=0)
    restored, data_state, meta = checkpoints.restore(2, abstract_like(template))
    kernel = restored["params"]["layers"][0]["mlp"]["gate_proj"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert int(restored["step"]) == 2 and data_state == {"epoch": 0, "position": 16}
    assert meta["metrics"] == {}
    _, actual = other_compiled.train(
        restored, device_batch(next_batch, other_compiled.batch_shardings)
    )
    for key in ("train/loss", "train/grad_norm"):
        np.testing.assert_allclose(float(actual[key]), float(expected[key]), rtol=2e-5)
    checkpoints.close()


def test_damaged_latest_checkpoint_is_skipped(tmp_path):
    mesh = sharding.single_device_mesh()
    state, _ = trained_state(mesh, steps=1)
    checkpoints = Checkpoints(tmp_path, keep_last=3)
    for step in (1, 2):
        checkpoints.save(step, state, {"position": step}, train_config())
    checkpoints.wait()
    for path in (tmp_path / "2" / "state").rglob("*"):
        if path.is_file() and path.stat().st_size > 0:
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    step, _, data_state, _ = checkpoints.restore_latest(abstract_like(state))
    assert (step, data_state) == (1, {"position": 1})
    # Kept aside, not deleted, and out of the way: the run saves step 2 again when it gets there.
    assert [p.name.split("-")[0] for p in checkpoints.damaged_dir.iterdir()] == ["2"]
    assert checkpoints.steps() == [1]
    checkpoints.save(2, state, {"position": 22}, train_config())
    checkpoints.wait()
    assert checkpoints.restore_latest(abstract_like(state))[::2] == (2, {"position": 22})
    checkpoints.close()


# Saves steps 1 and 2 of 24 sharded arrays, tears every other array file of step 2 (argv[2]:
# delete or truncate), then restores its parameters (as export does) and resumes. Intact reads
# come back 0.5 s late, as from a loaded machine's disk: when a torn read fails, Orbax closes its
# event loop with the others still in flight, which is what printed tracebacks (at random, as
# the timing fell) when they completed or were collected -- gc.collect() makes that certain.
TEAR_AND_RESTORE = """
import asyncio, gc, json, sys
from pathlib import Path

import jax
import numpy as np
from orbax.checkpoint._src.serialization import serialization

from configs import base
from sft_jax.train.sharding import abstract_like
from sft_jax.workdir.checkpointing import Checkpoints

directory, tear = Path(sys.argv[1]), sys.argv[2]
mesh = jax.sharding.Mesh(np.array(jax.devices()), ("fsdp",))
sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp"))
rng = np.random.default_rng(0)
params = {f"w{i:02d}": rng.standard_normal((8, 4096 * (i + 1)), np.float32) for i in range(24)}
state = {"params": jax.device_put(params, sharded)}
checkpoints = Checkpoints(directory, keep_last=2, async_save=False)
for step in (1, 2):
    checkpoints.save(step, state, {"position": step}, base.get_config())
arrays = sorted(p for p in (directory / "2" / "state").rglob("*") if p.stat().st_size > 65536)
for path in arrays[::2]:
    if tear == "delete":
        path.unlink()
    else:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

reads = {"ok": 0, "failed": 0}
read_shard = serialization._read_shard

async def slow_disk(*args, **kwargs):
    try:
        shard = await read_shard(*args, **kwargs)
    except Exception:
        reads["failed"] += 1
        raise
    reads["ok"] += 1
    await asyncio.sleep(0.5)
    return shard

serialization._read_shard = slow_disk
try:
    checkpoints.restore_params(2, abstract_like(state["params"]))
except Exception as e:
    print(f"export: step 2 cannot be read ({type(e).__name__})", file=sys.stderr)
gc.collect()
step, _, data_state, _ = checkpoints.restore_latest(abstract_like(state))
gc.collect()
checkpoints.close()
print(json.dumps({"step": step, "data": data_state, "reads": reads}))
"""


@pytest.mark.parametrize("tear", ["delete", "truncate"])
def test_a_torn_checkpoint_is_one_warning_without_tracebacks(tmp_path, tear):
    result = subprocess.run(
        [sys.executable, "-c", TEAR_AND_RESTORE, str(tmp_path / "checkpoints"), tear],
        cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=300,
        env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    outcome = json.loads(result.stdout.splitlines()[-1])
    assert (outcome["step"], outcome["data"]) == (1, {"position": 1})
    assert outcome["reads"]["ok"] > 0 and outcome["reads"]["failed"] > 0  # reads in flight
    for noise in ("Exception ignored", "Traceback", "Event loop is closed", "never retrieved"):
        assert noise not in result.stderr, result.stderr[-4000:]
    assert result.stderr.count("export: step 2 cannot be read") == 1, result.stderr[-2000:]
    warnings = [line for line in result.stderr.splitlines() if "cannot be restored" in line]
    assert len(warnings) == 1 and "checkpoint 2 in" in warnings[0], result.stderr[-2000:]
    assert "trying the one before" in warnings[0]


def test_checkpoints_of_another_config_are_an_error_not_damage(tmp_path):
    import ml_collections
    import pytest

    from configs import base
    from sft_jax.core.errors import ConfigError

    state, _ = trained_state(sharding.single_device_mesh(), steps=0)
    config = base.get_config()
    checkpoints = Checkpoints(tmp_path, async_save=False)
    checkpoints.save(1, state, {"position": 1}, config)
    changed = ml_collections.ConfigDict(config.to_dict())
    changed.lora.rank, changed.train.global_batch_size = 8, 64
    changed.train.learning_rate = 1e-5  # allowed to change
    with pytest.raises(ConfigError, match=r"lora.rank: 0 -> 8; train.global_batch_size: 32 -> 64"):
        checkpoints.restore_latest(abstract_like(state), changed)
    assert checkpoints.steps() == [1] and not checkpoints.damaged_dir.exists()
    relaxed = ml_collections.ConfigDict(config.to_dict())
    relaxed.train.learning_rate, relaxed.train.steps = 1e-5, 5000
    assert checkpoints.restore_latest(abstract_like(state), relaxed)[0] == 1
    checkpoints.close()


def test_keeps_last_k_and_the_best(tmp_path):
    mesh = sharding.single_device_mesh()
    state, _ = trained_state(mesh, steps=0)
    checkpoints = Checkpoints(tmp_path, keep_last=2, keep_best=1, async_save=False)
    losses = {1: 3.0, 2: 1.0, 3: 2.0, 4: 2.5, 5: 2.6}
    for step, loss in losses.items():
        checkpoints.save(step, state, {}, train_config(), metrics={"eval/loss": loss})
    checkpoints.save(6, state, {}, train_config())
    assert checkpoints.steps() == [2, 5, 6]
    assert checkpoints.best_step() == 2
    checkpoints.close()
