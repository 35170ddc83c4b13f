"""DPO with full fine-tuning: the reference is a frozen copy of the initial weights (sharded like
them, never trained, not in the optimizer state), checked against reference math from a second,
untouched model, and in XLA's memory plan (exactly one more copy of the weights)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from hf_models import save_hf_model
from test_preference import compiled_memory_of, demo_dpo_config, make_pairs, pair_batch

from sft_jax.core.spec import RunSpec
from sft_jax.models import from_pretrained
from sft_jax.objectives.loss import token_logps
from sft_jax.objectives.preference import (
    PairObjective,
    PreferenceSpec,
    attach_frozen_copy,
    pair_logps,
    pair_terms,
)
from sft_jax.objectives.preference_config import reference_of
from sft_jax.train.config_check import check_values

SPEC = PreferenceSpec("sigmoid", beta=0.5, rpo_alpha=0.3)


def perturbed(model, seed: int) -> None:
    """Moves every parameter (not the reference copy), as training would."""
    keys = iter(jax.random.split(jax.random.key(seed), 1000))
    for _, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value = variable.get_value()
        variable.set_value(value + 0.05 * jax.random.normal(next(keys), value.shape))


def test_a_frozen_copy_reference_equals_an_untouched_model(tmp_path):
    """Loss and gradients with reference='copy' after the weights moved equal the formula with
    the reference log-probs of a second model loaded from disk (rel 1e-5, float32); the copy
    gets no gradient."""
    save_hf_model("llama3.1", tmp_path)
    policy = from_pretrained(tmp_path)
    attach_frozen_copy(policy)
    perturbed(policy, seed=1)
    untouched = from_pretrained(tmp_path)
    batch = {k: jnp.asarray(v) for k, v in pair_batch(make_pairs(seed=3), 2).items()}
    objective = PairObjective(SPEC, "copy", max_pairs=2)
    graphdef, params, frozen = nnx.split(policy, nnx.Param, ...)

    def ours(params):
        sums = objective.sums(nnx.merge(graphdef, params, frozen), batch)
        return objective.loss(sums, objective.normalizer(batch))

    reference = pair_logps(token_logps(untouched, batch), batch, 2)

    def expected(params):
        model = nnx.merge(graphdef, params, frozen)
        logps = token_logps(model, batch)
        terms = pair_terms(SPEC, pair_logps(logps, batch, 2), reference)
        count = objective.normalizer(batch)
        chosen = batch["target_mask"] & (batch["segment_ids"] % 2 == 1)
        nll = -jnp.sum(jnp.where(chosen, logps, 0.0)) / count.chosen_tokens
        valid = pair_logps(jnp.ones_like(logps), batch, 2).valid
        return jnp.sum(jnp.where(valid, terms.loss, 0.0)) / count.pairs + SPEC.rpo_alpha * nll

    value, grads = jax.jit(jax.value_and_grad(ours))(params)
    want, want_grads = jax.jit(jax.value_and_grad(expected))(params)
    np.testing.assert_allclose(float(value), float(want), rtol=1e-5)
    assert abs(float(value) - float(expected_at_start(objective, tmp_path, batch))) > 1e-3
    for got, exp in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(got, exp, rtol=1e-5, atol=1e-7)
    assert not any("reference" in path for path, _ in nnx.to_flat_state(grads))


def expected_at_start(objective, path, batch):
    """The loss before the weights moved (policy = reference): every reward 0."""
    model = from_pretrained(path)
    attach_frozen_copy(model)
    return objective.loss(objective.sums(model, batch), objective.normalizer(batch))


def test_the_copy_is_one_more_copy_of_the_weights_in_the_memory_plan(tmp_path):
    """XLA's plan of the compiled full fine-tuning step: DPO with a frozen copy takes exactly the
    SFT step's arguments plus one copy of the weights (state and optimizer state unchanged)."""
    save_hf_model("llama3.1", tmp_path)
    model = from_pretrained(tmp_path)
    weights = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    sft = compiled_memory_of(model, None, nnx.Param)
    attach_frozen_copy(model)
    dpo = compiled_memory_of(model, PairObjective(SPEC, "copy"), nnx.Param)
    assert dpo.arguments - sft.arguments == weights


def test_full_fine_tuning_dpo_takes_the_copy():
    config = demo_dpo_config(**{"lora.rank": 0})
    check_values(RunSpec.of(config), 1, 1)
    assert reference_of(RunSpec.of(config)) == "copy"
    assert reference_of(RunSpec.of(demo_dpo_config())) == "adapters_off"
