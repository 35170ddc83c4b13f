"""The sampler's distribution (generation/sampler.sample): token frequencies of many draws match
a NumPy reference built from the published definitions of temperature, top_k, top_p and min_p
(transformers' warpers, applied in generate's order), by a chi-square goodness-of-fit test."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from sft_jax.generation.sampler import filter_logits, rollout, sample

# Shuffled, so that the sampler's sort matters; sorted: 0.30 0.20 0.15 0.12 0.10 0.07 0.04 0.02.
PROBS_V = np.array([0.10, 0.02, 0.30, 0.07, 0.15, 0.04, 0.20, 0.12])
LOGITS_V = np.log(PROBS_V).astype(np.float32)
DRAWS = 20_000  # rows of one batch; each row draws one token (arrays without a shape suffix: [V])
# A deterministic seed: with p > 1e-3 required, a correct sampler fails for 1 seed in 1000.
MIN_P_VALUE = 1e-3

sample_jit = jax.jit(sample, static_argnames="greedy")


def softmax_over(scores: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """softmax(scores) renormalised over the kept tokens, 0 elsewhere (float64)."""
    weights = np.where(keep, np.exp(scores - scores[keep].max()), 0.0)
    return weights / weights.sum()


def reference(
    logits: np.ndarray, temperature: float, top_k: int, top_p: float, min_p: float
) -> np.ndarray:
    """The sampling distribution by the definitions, in transformers' order: scale by
    1/temperature; keep the top_k largest; keep the smallest most-likely set whose probability
    (renormalised over what is kept) reaches top_p; keep tokens with probability >= min_p times
    the largest; renormalise."""
    scores = logits.astype(np.float64) / temperature
    keep = np.ones_like(scores, bool)
    if top_k > 0:
        keep &= scores >= np.sort(scores)[::-1][top_k - 1]
    if top_p < 1.0:
        probs = softmax_over(scores, keep)
        order = np.argsort(-probs)
        mass_before = np.cumsum(probs[order]) - probs[order]
        nucleus = np.zeros_like(keep)
        nucleus[order[mass_before < top_p]] = True
        keep &= nucleus
    if min_p > 0.0:
        probs = softmax_over(scores, keep)
        keep &= probs >= min_p * probs.max()
    return softmax_over(scores, keep)


def draw(temperature: float, top_k: int, top_p: float, min_p: float, seed: int = 0):
    """DRAWS tokens from `sample` (one jitted batch) and their log-probs."""
    logits_BxV = jnp.broadcast_to(jnp.asarray(LOGITS_V), (DRAWS, LOGITS_V.size))
    tokens_B, logps_B = sample_jit(
        logits_BxV,
        jax.random.key(seed),
        jnp.float32(temperature),
        jnp.float32(top_p),
        greedy=False,
        top_k=jnp.int32(top_k),
        min_p=jnp.float32(min_p),
    )
    return np.asarray(tokens_B), np.asarray(logps_B)


def chi_square(tokens_B: np.ndarray, expected: np.ndarray):
    """scipy's goodness-of-fit of the token counts to expected over its support."""
    support = expected > 0
    counts = np.bincount(tokens_B, minlength=expected.size)
    return stats.chisquare(counts[support], DRAWS * expected[support])


SETTINGS = {  # temperature, top_k, top_p, min_p -> how many tokens stay
    "temperature_0.7": ((0.7, 0, 1.0, 0.0), 8),
    "top_p_0.8": ((1.0, 0, 0.8, 0.0), 5),  # mass before the 5th is 0.77, the 6th's 0.87
    "top_k_3": ((1.0, 3, 1.0, 0.0), 3),
    "min_p_0.1": ((1.0, 0, 1.0, 0.1), 7),  # 0.02 < 0.1 * 0.30 <= 0.04
    # T = 1.5 flattens; top_k drops 2, the nucleus of the 6 left 1 more (mass before the 6th
    # 0.90, the 5th's 0.77), min_p the 5th (0.48 of the top's probability < 0.5 <= 0.54).
    "combined": ((1.5, 6, 0.8, 0.5), 4),
    # The nucleus of what top_k kept, renormalised: mass before the 5th 0.77 >= 0.75 (over all
    # 8 tokens it would be 0.70 and the 5th would stay).
    "top_k_then_top_p": ((1.5, 6, 0.75, 0.0), 4),
}


@pytest.mark.parametrize("setting", SETTINGS.values(), ids=SETTINGS.keys())
def test_frequencies_match_the_reference(setting):
    options, kept = setting
    expected = reference(LOGITS_V, *options)
    assert np.count_nonzero(expected) == kept  # the reference filters what the setting says
    tokens_B, logps_B = draw(*options)
    assert not np.any(np.isin(tokens_B, np.flatnonzero(expected == 0))), "a filtered token"
    result = chi_square(tokens_B, expected)
    assert result.pvalue > MIN_P_VALUE, (options, result)
    # The reported log-prob is softmax(logits / T)'s before the filters (an importance ratio's).
    temperature = options[0]
    unfiltered = np.log(softmax_over(LOGITS_V / temperature, np.ones(LOGITS_V.size, bool)))
    np.testing.assert_allclose(logps_B, unfiltered[tokens_B], rtol=1e-5, atol=1e-5)


def test_the_test_tells_a_wrong_distribution():
    """The draws at T = 0.7 reject T = 1's distribution, and the combined setting's reject its
    kept tokens weighted by the unscaled logits: the test has the power to see a mistake."""
    tokens_B, _ = draw(0.7, 0, 1.0, 0.0)
    assert chi_square(tokens_B, reference(LOGITS_V, 1.0, 0, 1.0, 0.0)).pvalue < 1e-12
    options, _ = SETTINGS["combined"]
    tokens_B, _ = draw(*options)
    unscaled = softmax_over(LOGITS_V.astype(np.float64), reference(LOGITS_V, *options) > 0)
    assert chi_square(tokens_B, unscaled).pvalue < 1e-12


def random_logits(batch: int = 64, vocab: int = 50) -> jax.Array:
    return 3 * jax.random.normal(jax.random.key(5), (batch, vocab))


def test_greedy_is_argmax_and_top_k_1_is_greedy():
    logits_BxV = random_logits()
    argmax_B = np.asarray(jnp.argmax(logits_BxV, axis=-1))
    greedy_B, greedy_logps_B = sample_jit(
        logits_BxV, jax.random.key(0), jnp.float32(1e-6), jnp.float32(1.0), greedy=True
    )
    np.testing.assert_array_equal(greedy_B, argmax_B)
    logp_BxV = jax.nn.log_softmax(logits_BxV, axis=-1)  # T = 1 when greedy
    np.testing.assert_allclose(greedy_logps_B, logp_BxV[np.arange(64), argmax_B], rtol=1e-6)
    for seed in range(3):
        top_1_B, _ = sample_jit(
            logits_BxV,
            jax.random.key(seed),
            jnp.float32(2.0),
            jnp.float32(1.0),
            greedy=False,
            top_k=jnp.int32(1),
            min_p=jnp.float32(0.0),
        )
        np.testing.assert_array_equal(top_1_B, argmax_B)


def test_filters_off_keep_every_token_of_a_large_vocabulary():
    """top_k 0, top_p 1 and min_p 0 drop nothing, not even the tail a float32 cumsum of 32k
    probabilities reaches 1 before (a nucleus at top_p 1 dropped hundreds of tokens per row)."""
    logits_BxV = 3 * jax.random.normal(jax.random.key(0), (8, 32_000))
    off_BxV = filter_logits(logits_BxV, jnp.int32(0), jnp.float32(1.0), jnp.float32(0.0))
    np.testing.assert_array_equal(off_BxV, logits_BxV)


def test_new_filter_values_reuse_the_compiled_sampler():
    """top_k, top_p and min_p are traced: other values run the same compilation."""
    traces = []

    @jax.jit
    def traced_sample(logits_BxV, key, temperature, top_k, top_p, min_p):
        traces.append(1)
        return sample(logits_BxV, key, temperature, top_p, False, top_k=top_k, min_p=min_p)

    for top_k, top_p, min_p in ((0, 1.0, 0.0), (3, 0.8, 0.1), (1, 0.5, 0.9)):
        traced_sample(
            random_logits(),
            jax.random.key(0),
            np.float32(0.7),
            np.int32(top_k),
            np.float32(top_p),
            np.float32(min_p),
        )
    assert len(traces) == 1


@pytest.mark.parametrize(
    "option", [{"top_k": -1}, {"top_k": 2.5}, {"top_p": 1.5}, {"min_p": -0.1}, {"min_p": 2.0}]
)
def test_rollout_refuses_options_transformers_refuses(option):
    with pytest.raises(ValueError, match=next(iter(option))):
        rollout(None, [[1]], max_new_tokens=1, stop_token_ids=[], temperature=1.0, **option)
