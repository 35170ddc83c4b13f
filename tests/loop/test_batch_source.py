"""The loop's batch source (loop/batch_source.py): files, or a producer that runs on the live
params (what online RL needs), resumed from the checkpointed source state."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from test_step import synthetic_batch
from test_trainer import base_config, synthetic_source

from sft_jax.core.spec import RunSpec
from sft_jax.loop import trainer
from sft_jax.loop.batch_source import OnPolicyBatches
from sft_jax.models import from_pretrained


@pytest.fixture(scope="module")
def model_dir(hf_checkpoint):
    return hf_checkpoint("llama3.1")[0]


def first_leaf(params) -> np.ndarray:
    return np.asarray(jax.device_get(jax.tree.leaves(params)[0]))


class Producer:
    """Batch `index` is synthetic_batch(index), whatever the params; records what it saw."""

    def __init__(self):
        self.seen: list[tuple[int, np.ndarray]] = []

    def __call__(self, params, index: int) -> dict[str, np.ndarray]:
        self.seen.append((index, first_leaf(params)))
        return synthetic_batch(index)


def on_policy(producer, config):
    return lambda steps: OnPolicyBatches(
        producer, steps.batch_shardings, config.train.global_batch_size
    )


def losses(workdir) -> list[float]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [r["train/loss"] for r in map(json.loads, lines) if "train/loss" in r]


@pytest.mark.e2e
def test_an_on_policy_producer_sees_the_params_each_step_wrote(model_dir, tmp_path):
    config = base_config(model_dir, steps=3, warmup_steps=0)  # every step moves the params
    config.eval.every_steps = 0
    files = trainer.Trainer(
        RunSpec.of(config), tmp_path / "files", from_pretrained(model_dir), synthetic_source()
    )
    initial = first_leaf(files.state["params"])
    files.train()
    producer = Producer()
    live = trainer.Trainer(
        RunSpec.of(config),
        tmp_path / "live",
        from_pretrained(model_dir),
        synthetic_source(),
        batch_source=on_policy(producer, config),
    )
    live.train()
    files.close()
    live.close()
    # One batch a step, none ahead: batch k was made from the params after k steps.
    assert [index for index, _ in producer.seen] == [0, 1, 2]
    np.testing.assert_array_equal(producer.seen[0][1], initial)
    for (_, before), (_, after) in zip(producer.seen, producer.seen[1:], strict=False):
        assert not np.array_equal(before, after)
    # The same batches as the file source gives (SyntheticBatches: batch n is synthetic_batch(n)).
    assert losses(tmp_path / "live") == losses(tmp_path / "files")
    np.testing.assert_array_equal(
        first_leaf(live.state["params"]), first_leaf(files.state["params"])
    )


@pytest.mark.e2e
def test_a_resumed_run_continues_the_producer_after_the_saved_batch(model_dir, tmp_path):
    config = base_config(model_dir, steps=2)
    config.eval.every_steps = 0
    config.checkpoint.enabled = True
    first, second = Producer(), Producer()

    def resumed_run(producer: Producer) -> trainer.Trainer:
        run = trainer.Trainer(
            RunSpec.of(config),
            tmp_path,
            from_pretrained(model_dir),
            synthetic_source(),
            batch_source=on_policy(producer, config),
        )
        run.resume()
        return run

    run = resumed_run(first)
    run.train()
    run.close()
    config.train.steps = 4
    run = resumed_run(second)
    assert run.source.get_state() == {"batches": 2}
    run.train()
    run.close()
    assert [i for i, _ in first.seen] == [0, 1] and [i for i, _ in second.seen] == [2, 3]
