"""DPO with reference='precomputed': the reference log-probs of every pair computed in one pass
with the initial weights and carried in the batches. Loss and gradients equal reference='copy'
(packed rows too), the compiled step holds no reference weights, and a resume is bitwise the
uninterrupted run."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_models import save_hf_model
from test_dpo_full import SPEC, perturbed
from test_preference import SEQ_LEN, demo_dpo_config, make_pairs
from test_step import train_config

from sft_jax.core.batch import REFERENCE_KEY
from sft_jax.core.spec import RunSpec
from sft_jax.data import preference as pair_data
from sft_jax.data import tokenize
from sft_jax.models import from_pretrained
from sft_jax.objectives.preference import PairObjective, attach_frozen_copy
from sft_jax.train import sharding
from sft_jax.train.compiled import build_steps, init_state
from sft_jax.train.optim import make_optimizer
from sft_jax.train.step import StepOptions

ROWS = 4  # train and eval rows of the compiled steps (the pass runs at the eval size)
MAX_PAIRS = 3


def compiled(model, objective):
    mesh = sharding.single_device_mesh()
    tx, schedule = make_optimizer(train_config())
    state, shardings = init_state(model, tx, mesh, nnx.Param)
    steps = build_steps(
        model, tx, schedule, mesh, shardings, train_rows=ROWS, eval_rows=ROWS, seq_len=SEQ_LEN,
        options=StepOptions(loss_chunk_size=8), objective=objective,
    )  # fmt: skip
    return steps, state


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(model dir, pairs whose reference log-probs the compiled pass filled, SFT's and the
    precomputed DPO step's memory plans)."""
    path = tmp_path_factory.mktemp("llama")
    save_hf_model("llama3.1", path)
    model = from_pretrained(path)
    sft, _ = compiled(model, None)
    steps, state = compiled(model, PairObjective(SPEC, "precomputed", max_pairs=MAX_PAIRS))
    documents = [doc for pair in make_pairs(seed=3, count=7) for doc in pair]
    pairs = pair_data.Pairs(tokenize.from_documents(documents, tokenize.empty_stats()))
    pairs.precompute_reference(
        lambda rows: steps.reference(state["params"], rows), ROWS, SEQ_LEN, MAX_PAIRS, (0, 1)
    )
    assert steps.batch_shardings[REFERENCE_KEY] == steps.batch_shardings["input_ids"]
    assert REFERENCE_KEY not in sft.batch_shardings  # the SFT step takes no such array
    return path, pairs, sft.train_memory, steps.train_memory


def test_loss_and_gradients_equal_the_frozen_copy(setup):
    """After the weights moved: the loss and every gradient with the pass's values in the batch
    equal those of a frozen copy of the initial weights (rel 1e-5, float32), in rows laid out
    otherwise than the pass's (one pair alone, packed by two and by three)."""
    path, pairs, _, _ = setup
    rows = [[4, 1, 2], [3], [5, 0], [6]]
    batch = {k: jnp.asarray(v) for k, v in pairs.make_rows(rows, SEQ_LEN).items()}
    mask = np.asarray(batch["target_mask"])
    assert np.all(np.asarray(batch[REFERENCE_KEY])[mask] < 0)  # every target has its value
    policy = from_pretrained(path)
    attach_frozen_copy(policy)
    perturbed(policy, seed=1)
    graphdef, params, frozen = nnx.split(policy, nnx.Param, ...)

    def loss_and_grads(reference: str):
        objective = PairObjective(SPEC, reference, max_pairs=max(len(r) for r in rows))

        def loss(params):
            sums = objective.sums(nnx.merge(graphdef, params, frozen), batch)
            return objective.loss(sums, objective.normalizer(batch))

        return jax.jit(jax.value_and_grad(loss))(params)

    (value, grads), (want, want_grads) = loss_and_grads("precomputed"), loss_and_grads("copy")
    np.testing.assert_allclose(float(value), float(want), rtol=1e-5)
    for got, exp in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(got, exp, rtol=1e-5, atol=1e-7)


def test_the_step_holds_no_copy_of_the_weights(setup):
    """XLA's plan of the compiled step: the SFT step's arguments plus the batch's reference
    log-probs (rows x T float32), nothing more; the frozen copy holds one more set of
    weights (tests/objectives/test_dpo_full.py)."""
    _, _, sft, dpo = setup
    assert dpo.arguments - sft.arguments == ROWS * SEQ_LEN * 4


def logged(lines: list[str]) -> dict[tuple[int, str], float]:
    """(step, name) -> value of the losses and eval margins in metrics.jsonl lines."""
    names = ("train/loss", "eval/loss", "eval/rewards/margins")
    return {(r["step"], k): r[k] for r in map(json.loads, lines) for k in names if k in r}


@pytest.mark.e2e
def test_resume_is_bitwise_the_uninterrupted_run(tmp_path):
    """4 updates of full fine-tuning DPO saved every 2; the last checkpoint removed (as if the
    run died after step 2) and the run started again: it recomputes the reference from
    model.name_or_path and its steps 3 and 4 (train and eval) are bitwise the first run's."""
    from sft_jax.loop import trainer
    from sft_jax.train.setup import open_run_data

    pairs = tmp_path / "pairs.jsonl"
    with open(demo_dpo_config().data.train_files) as source:
        pairs.write_text("".join(source.readlines()[:24]))
    config = demo_dpo_config(**{
        "lora.rank": 0, "preference.reference": "precomputed", "checkpoint.enabled": True,
        "checkpoint.every_steps": 2, "checkpoint.async_save": False, "eval.generate_examples": 0,
        "train.learning_rate": 1e-3, "log.every_steps": 1, "data.train_files": str(pairs),
        "data.eval_files": str(pairs), "eval.at_start": False, "eval.every_steps": 4,
    })  # fmt: skip
    tmp_path = tmp_path / "run"
    first = trainer.run(config, tmp_path, open_run_data)
    assert first["end_step"] == 4
    metrics = tmp_path / "metrics.jsonl"
    before = metrics.read_text().splitlines()
    shutil.rmtree(tmp_path / "checkpoints" / "4")
    resumed = trainer.run(config, tmp_path, open_run_data)
    assert resumed["start_step"] == 2
    losses, again = logged(before), logged(metrics.read_text().splitlines())
    assert {k for k in losses if k[0] > 2} == {
        (3, "train/loss"), (4, "train/loss"), (4, "eval/loss"), (4, "eval/rewards/margins")
    }  # fmt: skip
    assert again == losses
    assert losses[(4, "eval/rewards/margins")] != 0.0  # the policy moved off its reference


@pytest.mark.parametrize("rank", [0, 4])
def test_the_config_takes_precomputed_with_or_without_lora(rank):
    from sft_jax.objectives.preference_config import reference_of
    from sft_jax.train.config_check import check_values

    config = demo_dpo_config(**{"lora.rank": rank, "preference.reference": "precomputed"})
    check_values(RunSpec.of(config), 1, 1)
    assert reference_of(RunSpec.of(config)) == "precomputed"
