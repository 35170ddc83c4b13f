"""DeepSeek-V3's router: sigmoid scores, top-k chosen among the best groups of experts with a
score-correction bias, the chosen experts weighted by their (bias-free) scores.

Dimension legend: N tokens, D model width, X experts, G expert groups, K experts per token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def group_limited_route(
    x_NxD: jax.Array,
    router_DxX: jax.Array,
    score_bias: jax.Array,
    *,
    top_k: int,
    groups: int,
    top_groups: int,
    renormalize: bool,
    scaling: float,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(router logits [N, X], chosen experts [N, K], their weights [N, K]) in float32.

    A group scores by the sum of its two best biased scores; experts outside the best
    `top_groups` groups are never chosen; the top-k of the rest by biased score are chosen,
    weighted by their unbiased sigmoid scores (renormalized to sum to one where asked), times
    `scaling`. The bias only selects: no gradient reaches it (it stays frozen in fine-tuning).
    """
    logits_NxX = jnp.einsum("ND,DX->NX", x_NxD.astype(jnp.float32), router_DxX.astype(jnp.float32))
    scores_NxX = jax.nn.sigmoid(logits_NxX)
    choice_NxX = scores_NxX + jax.lax.stop_gradient(score_bias.astype(jnp.float32)).reshape(1, -1)
    tokens, experts = choice_NxX.shape
    per_group = experts // groups
    best_two_NxGx2, _ = jax.lax.top_k(choice_NxX.reshape(tokens, groups, per_group), 2)
    _, top_groups_NxG = jax.lax.top_k(jnp.sum(best_two_NxGx2, axis=-1), top_groups)
    kept_NxG = jnp.sum(jax.nn.one_hot(top_groups_NxG, groups, dtype=jnp.int32), axis=1) > 0
    kept_NxX = jnp.repeat(kept_NxG, per_group, axis=1)
    masked_NxX = jnp.where(kept_NxX, choice_NxX, -jnp.inf)
    _, experts_NxK = jax.lax.top_k(jax.lax.stop_gradient(masked_NxX), top_k)
    weights_NxK = jnp.take_along_axis(scores_NxX, experts_NxK, axis=1)
    if renormalize:
        weights_NxK = weights_NxK / (jnp.sum(weights_NxK, axis=-1, keepdims=True) + 1e-20)
    return logits_NxX, experts_NxK, weights_NxK * scaling
