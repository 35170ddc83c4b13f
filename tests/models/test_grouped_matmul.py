"""The planner's grouped-matmul stand-in (models/grouped_matmul.py) equals jax.lax.ragged_dot:
output and both gradients, an expert with no rows, rows past the groups' total, and inside the
expert block."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sft_jax.models.kernels.grouped_matmul import block_rows, grouped_matmul
from sft_jax.models.moe import dropless_experts


def product_and_gradients(matmul, lhs, rhs, group_sizes, d_out):
    out, pullback = jax.vjp(lambda a, b: matmul(a, b, group_sizes), lhs, rhs)
    return (out, *pullback(d_out))


@pytest.mark.parametrize(
    "group_sizes",
    [(7, 0, 5, 6), (0, 0, 20, 0), (3, 4, 5, 8), (1, 2, 0, 3)],
    ids=["empty-expert-and-unrouted-rows", "one-expert", "all-rows", "mostly-unrouted"],
)
def test_stand_in_equals_ragged_dot(group_sizes):
    keys = jax.random.split(jax.random.key(0), 3)
    lhs = jax.random.normal(keys[0], (20, 6))
    rhs = jax.random.normal(keys[1], (4, 6, 5))
    d_out = jax.random.normal(keys[2], (20, 5))
    sizes = jnp.array(group_sizes, jnp.int32)
    want = product_and_gradients(jax.lax.ragged_dot, lhs, rhs, sizes, d_out)
    got = jax.jit(product_and_gradients, static_argnums=0)(grouped_matmul, lhs, rhs, sizes, d_out)
    for name, w, g in zip(("output", "d_lhs", "d_rhs"), want, got, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5, err_msg=name)
    if group_sizes[1] == 0:  # an expert without rows gets a zero gradient
        assert not np.any(got[2][1])


def test_padding_never_exceeds_the_rows():
    for rows, groups in [(20, 4), (512, 128), (3, 8), (1 << 20, 128)]:
        block = block_rows(rows, groups)
        assert block & (block - 1) == 0 and block <= 128
        assert groups * (block - 1) <= max(rows, groups)


def test_expert_block_with_the_stand_in_equals_ragged_dot():
    """dropless_experts (routing, sorting, three grouped matmuls, unsorting) with either kind:
    equal output and gradients, a token routed past the experts included."""
    keys = jax.random.split(jax.random.key(1), 6)
    tokens, width, hidden, experts, top_k = 12, 8, 6, 4, 2
    x = jax.random.normal(keys[0], (tokens, width))
    chosen = jax.random.randint(keys[1], (tokens, top_k), 0, experts).at[0, 0].set(experts)
    weights = jax.nn.softmax(jax.random.normal(keys[2], (tokens, top_k)))
    gate = jax.random.normal(keys[3], (experts, width, hidden))
    up = jax.random.normal(keys[4], (experts, width, hidden))
    down = jax.random.normal(keys[5], (experts, hidden, width))

    def loss(kind, x, gate, up, down):
        out = dropless_experts(x, chosen, weights, gate, up, down, "silu", kind)
        return jnp.sum(out * jnp.cos(out))

    grad = jax.jit(jax.value_and_grad(loss, argnums=(1, 2, 3, 4)), static_argnums=0)
    want, got = grad("ragged_dot", x, gate, up, down), grad("padded_blocks", x, gate, up, down)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    for w, g in zip(want[1], got[1], strict=True):  # float32 sums in another order
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(w))))


def test_stand_in_equals_ragged_dot_under_shard_map():
    """Rows split over fsdp, experts over expert (as experts_per_shard runs it): the gradients
    are summed over the axes their operand does not vary over, as autodiff does for ragged_dot."""
    mesh = jax.make_mesh((2, 4), ("fsdp", "expert"))
    keys = jax.random.split(jax.random.key(2), 2)
    x = jax.device_put(jax.random.normal(keys[0], (16, 6)), NamedSharding(mesh, P("fsdp")))
    w = jax.device_put(jax.random.normal(keys[1], (8, 6, 5)), NamedSharding(mesh, P("expert")))

    def loss_and_gradients(matmul):
        def local(x, w):  # 8 rows, 2 experts per device: 2 rows each, 4 rows unrouted
            return matmul(x, w, jnp.array([2, 2], jnp.int32))

        sharded = jax.shard_map(
            local, mesh=mesh, in_specs=(P("fsdp"), P("expert")), out_specs=P("fsdp", "expert")
        )
        loss = jax.value_and_grad(lambda x, w: jnp.sum(jnp.sin(sharded(x, w))), (0, 1))
        return jax.jit(loss)(x, w)

    want, got = loss_and_gradients(jax.lax.ragged_dot), loss_and_gradients(grouped_matmul)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    for w_grad, g_grad in zip(want[1], got[1], strict=True):
        np.testing.assert_allclose(g_grad, w_grad, rtol=1e-5, atol=1e-5)
