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
