"""Logical axis names -> mesh axes: the one table, and kernels run per shard under a mesh.

Parameters carry logical axis names in their `logical_axes` metadata ("embed", "mlp",
"q_heads", ...), activations are named the same way where it matters; LOGICAL_RULES says which
mesh axes ("data", "fsdp", "expert", "context", "tensor") split each. Nothing else in models/
names a mesh axis.
Meshes are built by sft_jax.train.sharding.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "expert", "context", "tensor")

# Logical axis (as annotated on parameters and activations) -> mesh axes it is split over.
# "batch" rows are split over data-parallel, fsdp and expert replicas; weights are split over
# fsdp (gathered per layer by XLA) and tensor (Megatron-style column/row parallel layers), the
# stacked weights of a mixture of experts over expert (each device holds X / expert experts;
# outside the expert blocks the expert axis is one more data-parallel axis). The time axis of
# activations ("sequence") is split over context: each device holds T / context tokens of every
# row (in the load-balanced order of context_layout) and attends over all of them.
LOGICAL_RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp", "expert"),
    "expert": ("expert",),
    "vocab": ("tensor",),
    "embed": ("fsdp",),
    "mlp": ("tensor",),
    "q_heads": ("tensor",),
    "kv_heads": ("tensor",),
    "norm": (),
    "latent": ("fsdp",),  # the low-rank latent of latent attention (MLA), split like embed
    "lora_rank": (),
    "length": (),
    "sequence": ("context",),
}
CONTEXT_AXIS = "context"


def single_device_mesh() -> Mesh:
    """A mesh of the first device, with every axis of size 1."""
    return Mesh(np.asarray(jax.devices()[:1]).reshape((1,) * len(MESH_AXES)), MESH_AXES)


def fsdp_mesh() -> Mesh:
    """Every device (of every process) on the fsdp axis, the other axes of size 1."""
    devices = np.asarray(jax.devices())
    return Mesh(devices.reshape([len(devices) if a == "fsdp" else 1 for a in MESH_AXES]), MESH_AXES)


def logical_to_spec(
    logical_axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh
) -> PartitionSpec:
    """PartitionSpec for an array; a dimension not divisible by its mesh axes stays whole."""
    spec = []
    used: set[str] = set()
    for name, dim in zip(logical_axes, shape, strict=True):
        mesh_axes = (
            tuple(a for a in LOGICAL_RULES.get(name, ()) if mesh.shape[a] > 1 and a not in used)
            if name
            else ()
        )
        if mesh_axes and dim % math.prod(mesh.shape[a] for a in mesh_axes) == 0:
            spec.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
            used.update(mesh_axes)
        else:
            spec.append(None)
    return PartitionSpec(*spec)


def named_sharding(
    logical_axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh
) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(logical_axes, shape, mesh))


def attention_per_shard(
    local: Callable[..., jax.Array],
    q_BxTxKxGxE: jax.Array,
    k_BxSxKxE: jax.Array,
    v_BxSxKxE: jax.Array,
    segment_ids_BxT: jax.Array,
    *per_head_KxG: jax.Array,
) -> jax.Array:
    """local(q, k, v, segment_ids, *per_head) -> [B, T, K, G, E], run on each shard when a mesh
    is set (the train step sets one): rows split over the batch axes, key/value heads over
    tensor, and so the per-head arrays [K, G] given (attention sinks). Kernels that read a
    per-row table of the input then see only their own rows."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return local(q_BxTxKxGxE, k_BxSxKxE, v_BxSxKxE, segment_ids_BxT, *per_head_KxG)
    kv_spec = logical_to_spec(("batch", None, "kv_heads", None), k_BxSxKxE.shape, mesh)
    q_spec = PartitionSpec(*kv_spec[:3], None, None)
    head_specs = tuple(PartitionSpec(kv_spec[2], None) for _ in per_head_KxG)
    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(q_spec, kv_spec, kv_spec, PartitionSpec(kv_spec[0], None), *head_specs),
        out_specs=q_spec,
        check_vma=False,  # custom kernels do not declare how outputs vary over the mesh
    )(q_BxTxKxGxE, k_BxSxKxE, v_BxSxKxE, segment_ids_BxT, *per_head_KxG)


DISPATCH_KINDS = ("gather", "all_to_all")


def context_shards(mesh: jax.sharding.AbstractMesh | Mesh | None = None) -> int:
    """Devices the time axis is split over (the mesh's context axis; 1 without a mesh)."""
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    if mesh.empty or CONTEXT_AXIS not in mesh.shape:
        return 1
    return mesh.shape[CONTEXT_AXIS]


def balanced_order(seq_len: int, shards: int) -> np.ndarray:
    """Token order [T] that gives every context shard an equal share of causal attention work:
    the sequence is cut into 2 * shards chunks and shard i holds chunks i and 2 * shards - 1 - i
    (an early chunk, cheap, with its mirror, expensive). new[j] = old[order[j]]."""
    chunks = np.arange(seq_len).reshape(2 * shards, seq_len // (2 * shards))
    pairs = [np.concatenate([chunks[i], chunks[2 * shards - 1 - i]]) for i in range(shards)]
    return np.concatenate(pairs)


def context_layout(batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """The [B, T] arrays of a batch in balanced_order, split over the context axis (unchanged
    without one). Every per-token computation, and so every sum over tokens, is unchanged by
    the reordering; attention orders tokens by their positions (see context_attention)."""
    shards = context_shards()
    if shards == 1:
        return batch
    order = balanced_order(next(iter(batch.values())).shape[1], shards)
    spec = PartitionSpec(LOGICAL_RULES["batch"], CONTEXT_AXIS)
    return {
        key: jax.lax.with_sharding_constraint(jnp.take(x, order, axis=1), spec)
        for key, x in batch.items()
    }


def context_attention(
    local: Callable[..., jax.Array],
    q_BxTxKxGxE: jax.Array,
    k_BxSxKxE: jax.Array,
    v_BxSxKxE: jax.Array,
    segment_ids_BxT: jax.Array,
    positions_BxT: jax.Array,
) -> jax.Array:
    """local(q, k, v, q_segment_ids, q_positions, kv_segment_ids, kv_positions) -> [B, T, K, G, E]
    on each device of the context axis: its own T / context queries against the keys and values
    of the whole sequence, all-gathered over the axis (their gradients reduce-scattered back).

    Tokens arrive in context_layout's order, not the sequence's, so `local` must order them by
    position within a segment (documents are contiguous runs of increasing positions).
    All-gathered K/V rather than a ring: one collective per layer, simplest to keep exact, and
    K/V are small next to the activations (G query heads share each, and the scores are per
    query shard either way)."""
    mesh = jax.sharding.get_abstract_mesh()
    kv_spec = logical_to_spec(("batch", "sequence", "kv_heads", None), k_BxSxKxE.shape, mesh)
    q_spec = PartitionSpec(*kv_spec[:3], None, None)
    token_spec = PartitionSpec(kv_spec[0], kv_spec[1])
    gather = functools.partial(jax.lax.all_gather, axis_name=CONTEXT_AXIS, axis=1, tiled=True)

    def per_device(q, k, v, segment_ids, positions):
        return local(
            q, gather(k), gather(v), segment_ids, positions, gather(segment_ids), gather(positions)
        )

    return jax.shard_map(
        per_device,
        mesh=mesh,
        in_specs=(q_spec, kv_spec, kv_spec, token_spec, token_spec),
        out_specs=q_spec,
        check_vma=False,  # fused kernels do not declare how outputs vary over the mesh
    )(q_BxTxKxGxE, k_BxSxKxE, v_BxSxKxE, segment_ids_BxT, positions_BxT)


def experts_per_shard(
    local: Callable[..., jax.Array],
    x_NxD: jax.Array,
    experts_NxK: jax.Array,
    weights_NxK: jax.Array,
    stacked: tuple[jax.Array, ...],
    dispatch: str = "gather",
) -> jax.Array:
    """local(x, experts, weights, *stacked) -> [N, D], the weighted sum of the experts each token
    chose among the stacked experts [X, ...] it is given (an expert id >= X: none of them).

    Under a mesh with an expert axis (the train step sets one) each device holds X / expert
    experts and the tokens move to them by `dispatch`:
    - "gather": the tokens of the devices along the expert axis are gathered, each device runs
      its own experts on the slots routed to them, and the partial outputs are summed back
      onto the devices that own the tokens (reduce-scatter).
    - "all_to_all": each token copy (N * K per device) is sent to the device holding its expert
      and its output sent back (two all-to-alls). XLA's all-to-all has fixed buffers, so each
      device's buffer for each peer holds all its N * K copies (the worst case: dropless): G
      times the bytes a ragged all-to-all would send (which this jax cannot run on CPU).
    Without an expert axis (or with rows not split over it) local runs on every token.
    """
    if dispatch not in DISPATCH_KINDS:
        raise ValueError(f"dispatch={dispatch!r}: expected one of {DISPATCH_KINDS}.")
    mesh = jax.sharding.get_abstract_mesh()
    axis = "expert"
    num_experts = stacked[0].shape[0]
    if mesh.empty or axis not in mesh.shape or mesh.shape[axis] == 1:
        return local(x_NxD, experts_NxK, weights_NxK, *stacked)
    if num_experts % mesh.shape[axis]:
        return local(x_NxD, experts_NxK, weights_NxK, *stacked)
    rows = logical_to_spec(("batch", None), x_NxD.shape, mesh)
    row_axes = () if rows[0] is None else (rows[0],) if isinstance(rows[0], str) else rows[0]
    tokens_split = axis in row_axes
    if dispatch == "all_to_all" and tokens_split:
        per_device = functools.partial(_all_to_all_experts, local, axis)
    else:
        per_device = functools.partial(_gathered_experts, local, axis, tokens_split)
    stacked_spec = PartitionSpec(axis)
    return jax.shard_map(
        per_device,
        mesh=mesh,
        in_specs=(rows, rows, rows, *(stacked_spec for _ in stacked)),
        out_specs=rows,
    )(x_NxD, experts_NxK, weights_NxK, *stacked)


def _gathered_experts(local, axis, tokens_split, x_NxD, experts_NxK, weights_NxK, *stacked):
    """Per device: every token of the expert group through this device's experts, the partial
    sums reduce-scattered back to their owners."""
    if tokens_split:  # every token of this expert group, in device order
        gather = functools.partial(jax.lax.all_gather, axis_name=axis, tiled=True)
        x_NxD, experts_NxK, weights_NxK = gather(x_NxD), gather(experts_NxK), gather(weights_NxK)
    local_experts = stacked[0].shape[0]
    first = jax.lax.axis_index(axis) * local_experts
    own_NxK = (experts_NxK >= first) & (experts_NxK < first + local_experts)
    local_ids_NxK = jnp.where(own_NxK, experts_NxK - first, local_experts)
    out_NxD = local(x_NxD, local_ids_NxK, weights_NxK, *stacked)
    if tokens_split:
        return jax.lax.psum_scatter(out_NxD, axis, scatter_dimension=0, tiled=True)
    return jax.lax.psum(out_NxD, axis)


def _all_to_all_experts(local, axis, x_NxD, experts_NxK, weights_NxK, *stacked):
    """Per device: token copies sorted by expert (so by the device holding it, G of them), packed
    into G buffers of M = N * K rows, exchanged; the received rows run through this device's
    experts (empty rows carry the id "none") and go back the same way; the sender weights them.

    Dimension legend: G devices on the expert axis, M = N * K token copies, E experts per device.
    """
    num_tokens, top_k = experts_NxK.shape
    local_experts, devices = stacked[0].shape[0], jax.lax.axis_size(axis)
    copies = num_tokens * top_k
    flat_experts = experts_NxK.reshape(-1)
    order = jnp.argsort(flat_experts, stable=True)  # copies by expert, so by device
    expert_of_copy = flat_experts[order]
    device_of_copy = expert_of_copy // local_experts
    copies_per_device = jnp.sum(jax.nn.one_hot(device_of_copy, devices, dtype=jnp.int32), axis=0)
    row_of_copy = (
        jnp.arange(copies) - (jnp.cumsum(copies_per_device) - copies_per_device)[device_of_copy]
    )
    send_GxMxD = (
        jnp.zeros((devices, copies, x_NxD.shape[-1]), x_NxD.dtype)
        .at[device_of_copy, row_of_copy]
        .set(jnp.take(x_NxD, order // top_k, axis=0))
    )
    ids_GxM = jnp.full((devices, copies), local_experts, expert_of_copy.dtype)
    ids_GxM = ids_GxM.at[device_of_copy, row_of_copy].set(expert_of_copy % local_experts)
    exchange = functools.partial(jax.lax.all_to_all, axis_name=axis, split_axis=0, concat_axis=0)
    received_GxMxD, received_ids_GxM = exchange(send_GxMxD), exchange(ids_GxM)
    ones = jnp.ones((devices * copies, 1), weights_NxK.dtype)
    out_GxMxD = local(
        received_GxMxD.reshape(devices * copies, -1),
        received_ids_GxM.reshape(-1, 1),
        ones,
        *stacked,
    ).reshape(devices, copies, -1)
    returned_MxD = exchange(out_GxMxD)[device_of_copy, row_of_copy]
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(copies))
    out_NxKxD = returned_MxD[inverse].reshape(num_tokens, top_k, -1)
    combined_NxD = jnp.einsum(
        "NKD,NK->ND", out_NxKxD.astype(jnp.float32), weights_NxK.astype(jnp.float32)
    )
    return combined_NxD.astype(x_NxD.dtype)
