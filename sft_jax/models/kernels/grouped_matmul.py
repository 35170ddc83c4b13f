"""A grouped matmul in plain JAX with the memory of a GPU/TPU grouped-GEMM kernel: the planner's
stand-in for jax.lax.ragged_dot, which XLA:CPU lowers to one dense product per group over all
rows ([groups, rows, out] temporaries, linear in the expert count).

Rows are copied into a layout where each group is padded to whole blocks of `block` rows; a
loop over the blocks multiplies each by its group's weight, so temporaries are O(rows * out)
whatever the group count, and FLOPs those of the rows plus at most one padded block per group
(run FLOPs: XLA's cost analysis counts a loop's body once, so the planner's XLA-FLOPs column
undercounts the experts with it; its roofline takes the larger of that and the model's count).
A custom VJP runs the backward as the same loop (the input gradient per block, the weight
gradient accumulated into its group's slot), so autodiff saves no per-block weight copies.

Dimension legend: M rows (token copies sorted by group), I input width, O output width, G
groups (experts), P padded rows, C blocks (P = C * block).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

MAX_BLOCK = 128  # rows per block: a grouped-GEMM kernel's tile height


def block_rows(rows: int, groups: int) -> int:
    """The largest power of two <= rows / groups, at most MAX_BLOCK: the padding (at most one
    block per group) then never exceeds the rows themselves."""
    per_group = max(1, rows // max(1, groups))
    return min(MAX_BLOCK, 1 << (per_group.bit_length() - 1))


def padded_layout(
    group_sizes: jax.Array, rows: int, block: int
) -> tuple[jax.Array, jax.Array, int]:
    """(each row's position in the padded layout [M] (P where the row is in no group: past the
    groups' total, ragged_dot's zero rows), each block's group [C], P)."""
    groups = group_sizes.shape[0]
    blocks = -(-(rows + groups * (block - 1)) // block)  # enough for any split of the rows
    padded_sizes = (group_sizes + block - 1) // block * block
    padded_ends = jnp.cumsum(padded_sizes)
    ends = jnp.cumsum(group_sizes)
    row = jnp.arange(rows)
    group_of_row = jnp.searchsorted(ends, row, side="right")
    safe_group = jnp.minimum(group_of_row, groups - 1)
    offset = row - (ends - group_sizes)[safe_group]
    positions = jnp.where(
        group_of_row < groups, (padded_ends - padded_sizes)[safe_group] + offset, blocks * block
    )
    # Blocks past the last group hold only zero rows: any group serves them.
    block_group = jnp.minimum(
        jnp.searchsorted(padded_ends, jnp.arange(blocks) * block, side="right"), groups - 1
    )
    return positions, block_group, blocks * block


def _to_padded(x_MxI: jax.Array, positions: jax.Array, padded: int) -> jax.Array:
    return jnp.zeros((padded, x_MxI.shape[1]), x_MxI.dtype).at[positions].set(x_MxI, mode="drop")


def _from_padded(x_PxO: jax.Array, positions: jax.Array) -> jax.Array:
    return jnp.take(x_PxO, positions, axis=0, mode="fill", fill_value=0)


def grouped_matmul(lhs_MxI: jax.Array, rhs_GxIxO: jax.Array, group_sizes: jax.Array):
    """jax.lax.ragged_dot(lhs, rhs, group_sizes): row m of the first group_sizes[0] rows times
    rhs[0], of the next group_sizes[1] rows times rhs[1], ...; rows past the total are zero.
    One group (one expert per device) is ragged_dot itself: XLA:CPU's one dense product is
    then what a kernel does."""
    if rhs_GxIxO.shape[0] == 1:
        return jax.lax.ragged_dot(lhs_MxI, rhs_GxIxO, group_sizes)
    return _padded_blocks(lhs_MxI, rhs_GxIxO, group_sizes)


@jax.custom_vjp
def _padded_blocks(lhs_MxI: jax.Array, rhs_GxIxO: jax.Array, group_sizes: jax.Array):
    return _forward(lhs_MxI, rhs_GxIxO, group_sizes)


def _forward(lhs_MxI, rhs_GxIxO, group_sizes):
    rows, groups = lhs_MxI.shape[0], rhs_GxIxO.shape[0]
    block = block_rows(rows, groups)
    positions, block_group, padded = padded_layout(group_sizes, rows, block)
    lhs_PxI = _to_padded(lhs_MxI, positions, padded)

    def one_block(index):
        rows_BxI = jax.lax.dynamic_slice_in_dim(lhs_PxI, index * block, block)
        return jnp.dot(rows_BxI, rhs_GxIxO[block_group[index]])

    out_CxBxO = jax.lax.map(one_block, jnp.arange(padded // block))
    return _from_padded(out_CxBxO.reshape(padded, -1), positions)


def _forward_with_residuals(lhs_MxI, rhs_GxIxO, group_sizes):
    return _forward(lhs_MxI, rhs_GxIxO, group_sizes), (lhs_MxI, rhs_GxIxO, group_sizes)


def _backward(residuals, d_out_MxO):
    lhs_MxI, rhs_GxIxO, group_sizes = residuals
    rows, groups = lhs_MxI.shape[0], rhs_GxIxO.shape[0]
    block = block_rows(rows, groups)
    positions, block_group, padded = padded_layout(group_sizes, rows, block)
    lhs_PxI = _to_padded(lhs_MxI, positions, padded)
    d_out_PxO = _to_padded(d_out_MxO.astype(lhs_MxI.dtype), positions, padded)

    def one_block(d_rhs_GxIxO, index):
        group = block_group[index]
        rows_BxI = jax.lax.dynamic_slice_in_dim(lhs_PxI, index * block, block)
        d_rows_BxO = jax.lax.dynamic_slice_in_dim(d_out_PxO, index * block, block)
        d_rhs_GxIxO = d_rhs_GxIxO.at[group].add(jnp.dot(rows_BxI.T, d_rows_BxO))
        return d_rhs_GxIxO, jnp.dot(d_rows_BxO, rhs_GxIxO[group].T)

    # Under shard_map a loop's carry must vary over every mesh axis its updates vary over: a
    # zero computed from both operands (never their product: no inf * 0) carries those axes.
    zero = jnp.where(True, 0, lhs_PxI[0, 0] + d_out_PxO[0, 0]).astype(rhs_GxIxO.dtype)
    d_rhs_GxIxO, d_lhs_CxBxI = jax.lax.scan(
        one_block, jnp.zeros_like(rhs_GxIxO) + zero, jnp.arange(padded // block)
    )
    d_lhs_MxI = _from_padded(d_lhs_CxBxI.reshape(padded, -1), positions)
    return _summed_like(d_lhs_MxI, lhs_MxI), _summed_like(d_rhs_GxIxO, rhs_GxIxO), None


def _varying_axes(x: jax.Array) -> frozenset:
    """The shard_map mesh axes `x` varies over (none outside shard_map)."""
    axis_type = getattr(jax.typeof(x), "manual_axis_type", None)  # jax 0.10's name
    return frozenset(getattr(axis_type, "varying", None) or ())


def _summed_like(gradient: jax.Array, primal: jax.Array) -> jax.Array:
    """`gradient` summed over the mesh axes it varies over and `primal` does not: the psum
    autodiff inserts when it transposes ragged_dot under shard_map."""
    extra = tuple(sorted(_varying_axes(gradient) - _varying_axes(primal)))
    return jax.lax.psum(gradient, extra) if extra else gradient


_padded_blocks.defvjp(_forward_with_residuals, _backward)

# What MoEBlock.grouped_matmul names: the kernel the run uses, or the planner's stand-in.
GROUPED_MATMULS = {"ragged_dot": jax.lax.ragged_dot, "padded_blocks": grouped_matmul}
STAND_IN = "padded_blocks"


def grouped_matmul_kind(kind: str):
    """The grouped matmul named `kind` (a key of GROUPED_MATMULS)."""
    if kind not in GROUPED_MATMULS:
        raise ValueError(f"grouped matmul {kind!r}: expected one of {tuple(GROUPED_MATMULS)}.")
    return GROUPED_MATMULS[kind]
