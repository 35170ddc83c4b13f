"""Train step invariants: mesh-independence, accumulation, masking, one compilation."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
import pytest
from flax import nnx
from hf_models import hf_config

from configs import base
from sft_jax.core.spec import RunSpec, TrainSpec
from sft_jax.models import CausalLM, from_hf_config
from sft_jax.objectives.loss import loss_sums
from sft_jax.train import sharding
from sft_jax.train.compiled import build_steps, init_state
from sft_jax.train.optim import make_optimizer
from sft_jax.train.sharding import device_batch
from sft_jax.train.step import StepOptions

SEQ_LEN = 16
ROWS = 8


def train_config(**overrides) -> TrainSpec:
    """config.train of configs/base.py with the test optimizer's values, and `overrides`."""
    values = {
        "steps": 10,
        "learning_rate": 1e-2,
        "warmup_steps": 2,
        "lr_schedule": "cosine",
        "min_lr_ratio": 0.1,
        "weight_decay": 0.1,
        "adam_b1": 0.9,
        "adam_b2": 0.95,
        "adam_eps": 1e-8,
        "max_grad_norm": 1.0,
    }
    return RunSpec.of(base.get_config()).train.replace(**{**values, **overrides})


def synthetic_batch(seed: int, rows: int = ROWS, vocab: int = 128) -> dict[str, np.ndarray]:
    """Rows of two packed documents each, padding at the end, uneven random target masks."""
    rng = np.random.default_rng(seed)
    lengths = []
    for _ in range(rows):
        first = rng.integers(3, 9)
        lengths.append((first, rng.integers(2, SEQ_LEN - first)))
    return packed_rows(rng, lengths, SEQ_LEN, vocab, trained=0.7)


def packed_rows(
    rng: np.random.Generator, lengths: Sequence[Sequence[int]], seq_len: int, vocab: int,
    trained: float,
) -> dict[str, np.ndarray]:  # fmt: skip
    """A batch whose row r packs documents of lengths[r] (random tokens, a `trained` fraction
    of targets kept), padding after them."""
    rows = len(lengths)
    batch = {
        k: np.zeros((rows, seq_len), np.int32)
        for k in ("input_ids", "target_ids", "positions", "segment_ids")
    }
    batch["target_mask"] = np.zeros((rows, seq_len), bool)
    for r, row_lengths in enumerate(lengths):
        start = 0
        for segment, length in enumerate(row_lengths, start=1):
            tokens = rng.integers(3, vocab, size=length)
            span = slice(start, start + length)
            batch["input_ids"][r, span] = tokens
            batch["target_ids"][r, start : start + length - 1] = tokens[1:]
            batch["positions"][r, span] = np.arange(length)
            batch["segment_ids"][r, span] = segment
            batch["target_mask"][r, start : start + length - 1] = rng.random(length - 1) < trained
            start += length
    return batch


def mean_loss(
    model: CausalLM, batch: dict, max_chunk: int, z_weight: float = 0.0
) -> tuple[Callable[[Any], jax.Array], Any]:
    """(params -> the batch's mean loss per target token under `model`, the model's params)."""
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(params):
        sums = loss_sums(nnx.merge(graphdef, params), batch, max_chunk=max_chunk)
        return (sums.nll + z_weight * sums.z) / sums.target_tokens

    return loss, params


def step_builder(
    model: CausalLM, mesh, rows: int, seq_len: int, **options
) -> Callable[[CausalLM], Any]:
    """model -> its compiled Steps on `mesh` (train and eval batches of `rows` x `seq_len`, the
    test optimizer, StepOptions(**options)); the state's layout is `model`'s."""
    tx, schedule = make_optimizer(train_config())
    _, shardings = init_state(model, tx, mesh)
    return functools.partial(
        build_steps, tx=tx, schedule=schedule, mesh=mesh, state_shardings=shardings,
        train_rows=rows, eval_rows=rows, seq_len=seq_len, options=StepOptions(**options),
    )  # fmt: skip


def tiny_model(family: str = "llama3.1") -> CausalLM:
    return CausalLM(from_hf_config(hf_config(family)), rngs=nnx.Rngs(0))


def run_steps(
    mesh,
    batches,
    *,
    accumulation: int = 1,
    family: str = "llama3.1",
    rows: int = ROWS,
    seq_len: int = SEQ_LEN,
    loss_chunk_size: int = 4,
    objective=None,
):
    """(metrics of a compiled train step over each batch, the final state, the steps) of the
    tiny model of `family` on `mesh`; the objective is SFT's unless given."""
    model = tiny_model(family)
    tx, schedule = make_optimizer(train_config())
    state, shardings = init_state(model, tx, mesh)
    steps = build_steps(
        model,
        tx,
        schedule,
        mesh,
        shardings,
        train_rows=rows,
        eval_rows=rows,
        seq_len=seq_len,
        options=StepOptions(
            gradient_accumulation_steps=accumulation, loss_chunk_size=loss_chunk_size
        ),
        objective=objective,
    )
    history = []
    for batch in batches:
        state, metrics = steps.train(state, device_batch(batch, steps.batch_shardings))
        history.append(jax.device_get(metrics))
    return history, state, steps


def _curve(history, key):
    return np.array([m[key] for m in history])


@pytest.fixture(scope="module")
def single_device_history():
    batches = [synthetic_batch(seed) for seed in range(3)]
    return batches, run_steps(sharding.single_device_mesh(), batches)[0]


@pytest.mark.parametrize(
    "data,fsdp,tensor",
    [(8, 1, 1), (1, 8, 1), (1, 4, 2), (2, 2, 2)],
    ids=["data8", "fsdp8", "fsdp4xtp2", "2x2x2"],
)
def test_mesh_does_not_change_losses(single_device_history, data, fsdp, tensor):
    batches, expected = single_device_history
    history, state, _ = run_steps(sharding.make_mesh(data, fsdp, tensor), batches)
    for key in ("train/loss", "train/grad_norm", "train/target_tokens"):
        np.testing.assert_allclose(
            _curve(history, key), _curve(expected, key), rtol=2e-5, err_msg=key
        )
    kernel = state["params"]["layers"][0]["mlp"]["gate_proj"]["kernel"]
    assert len({d for d in kernel.sharding.device_set}) == 8


def test_gradient_accumulation_equals_one_big_batch(single_device_history):
    """4 micro-batches of 2 rows with uneven target counts == one batch of 8 rows."""
    batches, expected = single_device_history
    counts = [int(batches[0]["target_mask"][j::4].sum()) for j in range(4)]
    assert len(set(counts)) > 1, "the test needs micro-batches with different target counts"
    history, _, _ = run_steps(sharding.single_device_mesh(), batches, accumulation=4)
    for key in ("train/loss", "train/grad_norm"):
        np.testing.assert_allclose(
            _curve(history, key), _curve(expected, key), rtol=2e-5, err_msg=key
        )


def test_masked_tokens_have_no_influence():
    """Changing tokens whose targets are masked, and masked targets, changes nothing but what
    they feed causally: here the changed tokens are the last of each document."""
    batch = synthetic_batch(7)
    changed = {k: v.copy() for k, v in batch.items()}
    untrained = ~batch["target_mask"]
    changed["target_ids"][untrained] = (changed["target_ids"][untrained] + 5) % 128
    last_of_doc = (batch["segment_ids"] > 0) & np.roll(
        batch["segment_ids"] != batch["segment_ids"], -1, axis=1
    )
    changed["input_ids"][last_of_doc] = (changed["input_ids"][last_of_doc] + 7) % 128
    mesh = sharding.single_device_mesh()
    reference, state_a, _ = run_steps(mesh, [batch])
    perturbed, state_b, _ = run_steps(mesh, [changed])
    assert reference[0]["train/loss"] == perturbed[0]["train/loss"]
    for a, b in zip(
        jax.tree.leaves(state_a["params"]), jax.tree.leaves(state_b["params"]), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_steps_compile_once_and_reject_other_shapes():
    batches = [synthetic_batch(seed) for seed in range(3)]
    _, state, steps = run_steps(sharding.single_device_mesh(), batches)
    # Compiled ahead of time: another shape is refused, never recompiled.
    wrong = {k: v[:, : SEQ_LEN // 2] for k, v in batches[0].items()}
    with pytest.raises((TypeError, ValueError)):
        steps.train(state, device_batch(wrong, steps.batch_shardings))
    sums = steps.eval(state["params"], device_batch(batches[0], steps.batch_shardings))
    assert float(sums.target_tokens) == batches[0]["target_mask"].sum()
