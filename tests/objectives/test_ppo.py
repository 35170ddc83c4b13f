"""PPO's building blocks (objectives/ppo.py) against a NumPy reference written from the
published formulas, loop by loop, on fixed rollouts of ragged completions (rel 1e-5)."""

from __future__ import annotations

import numpy as np
import pytest

from sft_jax.objectives import ppo

SPEC = ppo.PPOSpec(gamma=0.99, lam=0.9, kl_coef=0.07, cliprange=0.2, cliprange_value=0.15,
                   vf_coef=0.3)  # fmt: skip


def rollouts(seed: int = 0):
    """4 rows of 9 positions; completions at ragged offsets and lengths (one of length 1)."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((4, 9), bool)
    for row, (start, length) in enumerate([(2, 5), (0, 9), (4, 1), (1, 6)]):
        mask[row, start : start + length] = True
    draw = lambda scale: (scale * rng.standard_normal((4, 9))).astype(np.float32)  # noqa: E731
    logps, ref = -np.abs(draw(1.0)), -np.abs(draw(1.0))
    return {
        "mask": mask,
        "scores": rng.standard_normal(4).astype(np.float32),
        "logps": logps,
        "ref": ref,
        "old_logps": logps + draw(0.3),
        "values": draw(0.5),
        "new_values": draw(0.5),
    }


def reference(r: dict) -> dict:
    """Advantages, returns and losses by the formulas, one completion at a time."""
    b, t = r["mask"].shape
    rewards, advantages, returns = (np.zeros((b, t)) for _ in range(3))
    for i in range(b):
        steps = np.flatnonzero(r["mask"][i])
        for k in steps:
            rewards[i, k] = -SPEC.kl_coef * (r["logps"][i, k] - r["ref"][i, k])
        rewards[i, steps[-1]] += r["scores"][i]
        later = 0.0
        for j, k in reversed(list(enumerate(steps))):
            next_value = r["values"][i, steps[j + 1]] if j + 1 < len(steps) else 0.0
            delta = rewards[i, k] + SPEC.gamma * next_value - r["values"][i, k]
            later = delta + SPEC.gamma * SPEC.lam * later
            advantages[i, k] = later
            returns[i, k] = later + r["values"][i, k]
    m = r["mask"]
    a = advantages[m]
    whitened = np.zeros((b, t))
    whitened[m] = (a - a.mean()) / np.sqrt(a.var(ddof=1) + 1e-8)
    ratio = np.exp(r["logps"] - r["old_logps"])[m]
    adv = whitened[m]
    pg = np.maximum(-adv * ratio, -adv * np.clip(ratio, 1 - SPEC.cliprange, 1 + SPEC.cliprange))
    v, old_v, ret = r["new_values"][m], r["values"][m], returns[m]
    clipped_v = old_v + np.clip(v - old_v, -SPEC.cliprange_value, SPEC.cliprange_value)
    vf = 0.5 * np.maximum((v - ret) ** 2, (clipped_v - ret) ** 2)
    return {
        "rewards": rewards,
        "advantages": advantages,
        "returns": returns,
        "whitened": whitened,
        "policy": pg.mean(),
        "value": vf.mean(),
        "loss": pg.mean() + SPEC.vf_coef * vf.mean(),
    }


@pytest.mark.parametrize("seed", [0, 1])
def test_rewards_advantages_and_losses_equal_the_published_formulas(seed):
    r = rollouts(seed)
    expected = reference(r)
    rewards = ppo.token_rewards(SPEC, r["scores"], r["logps"], r["ref"], r["mask"])
    advantages, returns = ppo.gae(SPEC, rewards, r["values"], r["mask"])
    whitened = ppo.whiten(advantages, r["mask"])
    out = ppo.losses(
        SPEC, r["logps"], r["old_logps"], whitened, r["new_values"], r["values"], returns, r["mask"]
    )
    for name, ours in [("rewards", rewards), ("advantages", advantages), ("returns", returns),
                       ("whitened", whitened)]:  # fmt: skip
        np.testing.assert_allclose(np.asarray(ours), expected[name], rtol=1e-5, atol=1e-6)
    for name in ("policy", "value", "loss"):
        np.testing.assert_allclose(float(getattr(out, name)), expected[name], rtol=1e-5)
    assert 0.0 < float(out.clip_fraction) < 1.0  # the fixed rollouts exercise the clip


def test_a_one_token_completion_has_one_delta_and_no_bootstrap():
    r = rollouts()
    rewards = ppo.token_rewards(SPEC, r["scores"], r["logps"], r["ref"], r["mask"])
    advantages, _ = ppo.gae(SPEC, rewards, r["values"], r["mask"])
    k = 4  # row 2's only completion token
    assert float(advantages[2, k]) == pytest.approx(
        float(rewards[2, k]) - float(r["values"][2, k]), rel=1e-6
    )
    assert np.count_nonzero(np.asarray(advantages[2])) == 1


def test_the_run_objective_equals_the_formulas_over_micro_batches():
    """ppo_run: rollout_fields gives the reference's advantages and returns from a rollout's
    scores, log-probs and values; the loss summed over two micro-batches of a tiny model equals
    ppo.losses on the whole batch."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from test_step import tiny_model

    from sft_jax.models.value_head import attach_value_head
    from sft_jax.objectives import grpo, ppo_run

    r = rollouts(2)
    expected = reference(r)
    objective = ppo_run.PPOObjective(SPEC, loss_chunk_size=9, reference="none")
    outputs = (r["logps"], r["ref"], np.zeros_like(r["logps"]), r["values"])
    made = objective.rollout_fields(r["scores"][:, None], np.ones(1), r["mask"], outputs)
    np.testing.assert_allclose(
        made.fields[ppo_run.ADVANTAGES_KEY], expected["whitened"], rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        made.fields[ppo_run.RETURNS_KEY], expected["returns"], rtol=1e-5, atol=1e-6
    )

    model = tiny_model()
    attach_value_head(model)
    model.value_head.weight[...] = 0.1 * jax.random.normal(
        jax.random.key(3), (model.config.hidden_size,)
    )
    rng = np.random.default_rng(0)
    ids = rng.integers(3, model.config.vocab_size, (4, 10)).astype(np.int32)
    batch = {
        "input_ids": ids[:, :-1],
        "target_ids": ids[:, 1:],
        "target_mask": r["mask"],
        "positions": np.broadcast_to(np.arange(9, dtype=np.int32), (4, 9)).copy(),
        "segment_ids": np.ones((4, 9), np.int32),
    } | {k: np.asarray(v, np.float32) for k, v in made.fields.items()}
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    parts = [{k: v[i::2] for k, v in batch.items()} for i in range(2)]
    sums = jax.tree.map(lambda *xs: sum(xs), *[objective.sums(model, p) for p in parts])
    ours = objective.loss(sums, objective.normalizer(batch))
    logps, _, _, values = objective.rollout_logps(model, batch)
    whole = ppo.losses(
        SPEC,
        logps,
        batch[grpo.OLD_LOGPS_KEY],
        batch[ppo_run.ADVANTAGES_KEY],
        values,
        batch[ppo_run.OLD_VALUES_KEY],
        batch[ppo_run.RETURNS_KEY],
        batch["target_mask"],
    )
    assert float(ours) == pytest.approx(float(whole.loss), rel=1e-5)
    assert float(whole.value) > 0 and nnx.state(model.value_head)  # the critic is in the graph
