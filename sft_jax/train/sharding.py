"""The device mesh and the shardings of what lives on it: train state, batches, abstract state.

Logical axis names map to mesh axes through the one table in models/partitioning.py; this
module builds meshes from config and lays arrays (and their abstract stand-ins) out on them.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sft_jax.core.batch import BASE_KEYS, FIELDS, IMAGE, ROW, TOKEN, shape
from sft_jax.core.errors import ConfigError
from sft_jax.core.spec import RunSpec
from sft_jax.models.partitioning import (
    CONTEXT_AXIS,
    LOGICAL_RULES,
    MESH_AXES,
    context_shards,
    named_sharding,
    single_device_mesh,
)

__all__ = ["make_mesh", "mesh_for", "row_feed", "single_device_mesh"]


def make_mesh(
    data: int = 1,
    fsdp: int = -1,
    tensor: int = 1,
    devices: Sequence[jax.Device] | None = None,
    expert: int = 1,
    context: int = 1,
) -> Mesh:
    """A (data, fsdp, expert, context, tensor) mesh over `devices` (all by default); one -1
    fills the rest."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, expert, context, tensor]
    if sizes.count(-1) > 1:
        raise ConfigError(
            f"mesh {dict(zip(MESH_AXES, sizes, strict=True))}: at most one axis may be -1."
        )
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ConfigError(f"{len(devices)} devices cannot be split into a mesh with {sizes}.")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ConfigError(
            f"mesh data={sizes[0]} x fsdp={sizes[1]} x expert={sizes[2]} x context={sizes[3]} "
            f"x tensor={sizes[4]} needs {math.prod(sizes)} devices, but {len(devices)} are "
            "available."
        )
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def mesh_for(config: RunSpec) -> Mesh:
    """The mesh config.mesh asks for, over every device of the job."""
    mesh = config.mesh
    context = mesh.context
    return make_mesh(mesh.data, mesh.fsdp, mesh.tensor, expert=mesh.expert, context=context)


def batch_shards(mesh: Mesh) -> int:
    """Devices a batch's rows are split over (the mesh's data x fsdp x expert axes)."""
    return math.prod(mesh.shape[axis] for axis in LOGICAL_RULES["batch"])


def param_shardings(model: nnx.Module, mesh: Mesh, which: Any = nnx.Param) -> dict[str, Any]:
    """NamedSharding per variable selected by `which` (a pure dict), from logical axes."""
    flat = {}
    for path, variable in nnx.to_flat_state(nnx.state(model, which)):
        value = variable.get_value()
        flat[path] = named_sharding(variable.get_metadata()["logical_axes"], value.shape, mesh)
    return nnx.to_pure_dict(nnx.from_flat_state(flat))


def _keystr(path: tuple[Any, ...]) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def opt_state_shardings(abstract_opt_state: Any, params_shardings: Any, mesh: Mesh) -> Any:
    """Leaves mirroring a parameter (Adam moments) take its sharding; the rest replicate."""
    by_path = {
        _keystr(path): s for path, s in jax.tree_util.tree_flatten_with_path(params_shardings)[0]
    }
    replicated = NamedSharding(mesh, PartitionSpec())

    def pick(path: tuple[Any, ...], leaf: jax.ShapeDtypeStruct) -> NamedSharding:
        keys = _keystr(path)
        for start in range(len(keys)):
            match = by_path.get(keys[start:])
            if match is not None and len(match.spec) <= leaf.ndim:
                return match
        return replicated

    return jax.tree_util.tree_map_with_path(pick, abstract_opt_state)


def batch_shardings(mesh: Mesh, keys: Sequence[str] = BASE_KEYS) -> dict[str, NamedSharding]:
    """Rows split over the batch axes; with a context axis, the time axis of per-token arrays
    over it too (core/batch.py: each field's kind). keys: the batch's arrays (an objective's
    own keys after core.batch.BASE_KEYS)."""
    time = CONTEXT_AXIS if context_shards(mesh) > 1 else None
    batch_axes = LOGICAL_RULES["batch"]
    specs = {
        TOKEN: PartitionSpec(batch_axes, time),
        ROW: PartitionSpec(batch_axes),
        IMAGE: PartitionSpec(batch_axes),
    }
    segment = PartitionSpec(batch_axes, None)
    return {k: NamedSharding(mesh, specs.get(FIELDS[k].kind, segment)) for k in keys}


def abstract_batch(
    rows: int,
    seq_len: int,
    mesh: Mesh,
    keys: Sequence[str] = BASE_KEYS,
    per_row: dict[str, tuple[int, ...]] | None = None,
) -> dict[str, jax.ShapeDtypeStruct]:
    """per_row: each image field's shape per row (core/batch.shape)."""
    return {
        k: jax.ShapeDtypeStruct(shape(k, rows, seq_len, per_row), FIELDS[k].dtype, sharding=s)
        for k, s in batch_shardings(mesh, keys).items()
    }


@functools.cache
def row_feed(mesh: Mesh) -> tuple[int, int]:
    """(block, blocks): which rows of each global batch this process feeds. The rows are cut
    into `blocks` equal contiguous blocks and this process feeds block `block`, whole rows.

    A data-parallel group of processes (their devices hold the same rows: a context or tensor
    axis spans them) is one block, fed by each of its processes; without one, every process
    is its own block. The data pipeline takes its share from this, device_batch lays it out."""
    sharding = NamedSharding(mesh, PartitionSpec(LOGICAL_RULES["batch"]))
    holds: dict[int, set[int]] = {}  # process -> the row shards its devices hold
    for device, (rows,) in sharding.devices_indices_map((batch_shards(mesh),)).items():
        holds.setdefault(device.process_index, set()).add(rows.start or 0)
    blocks = row_blocks(holds, batch_shards(mesh), dict(mesh.shape))
    return blocks.index(tuple(sorted(holds[jax.process_index()]))), len(blocks)


def row_blocks(
    holds: dict[int, set[int]], shards: int, mesh_shape: dict[str, int]
) -> list[tuple[int, ...]]:
    """The blocks of row shards processes feed, in row order, from the row shards each
    process's devices hold (`holds`); a ConfigError when they are not equal contiguous blocks
    that processes share whole or not at all (no process could then feed whole rows)."""
    blocks = sorted({tuple(sorted(held)) for held in holds.values()})
    in_order = [shard for block in blocks for shard in block] == list(range(shards))
    if in_order and len({len(block) for block in blocks}) == 1:
        return blocks
    per_process = {process: sorted(held) for process, held in sorted(holds.items())}
    raise ConfigError(
        f"mesh {mesh_shape} over {len(holds)} processes: the row shards of the batch that each "
        f"process's devices hold ({per_process}) are not equal contiguous blocks that processes "
        "share whole or not at all, so the processes cannot feed whole rows. Make "
        "config.mesh.context x config.mesh.tensor divide the devices of one process, or be a "
        "multiple of them."
    )


def device_batch(
    local_batch: dict[str, Any], shardings: dict[str, NamedSharding], global_rows: int = 0
) -> dict[str, jax.Array]:
    """This process's rows of the global batch (block row_feed of each sharding's mesh, whole
    rows in sequence order) -> global arrays sharded over the mesh: each device takes its rows
    and, under a context axis, its contiguous slice of the time axis (step.context_layout
    reorders them on the devices). The arrays `shardings` names; a batch may hold more.
    global_rows: the batch's rows over every process, checked against the feed (0: not)."""
    out = {}
    for key, sharding in shardings.items():
        local = np.asarray(local_batch[key], FIELDS[key].dtype)
        block, blocks = row_feed(sharding.mesh)
        if global_rows and local.shape[0] * blocks != global_rows:
            raise ConfigError(
                f"this process fed {local.shape[0]} rows of a {global_rows}-row batch that the "
                f"mesh cuts into {blocks} block(s) of {global_rows // blocks} rows, one per "
                "data-parallel group of processes (sharding.row_feed): a data source must take "
                "its rows from the feed trainer.run passes it (data_factory(config, feed))."
            )
        first = block * local.shape[0]

        def piece(index: tuple[slice, ...], local=local, first=first) -> np.ndarray:
            rows, *rest = index
            start = (rows.start or 0) - first
            stop = local.shape[0] if rows.stop is None else rows.stop - first
            return local[(slice(start, stop), *rest)]

        shape = (local.shape[0] * blocks, *local.shape[1:])
        out[key] = jax.make_array_from_callback(shape, sharding, piece)
    return out


def with_shardings(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `tree`'s arrays (or abstract arrays) laid out as `shardings`."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs with the shardings of `tree`'s arrays: the target a restore (or a
    compile) lays out onto."""
    return with_shardings(tree, jax.tree.map(lambda x: x.sharding, tree))


def abstract_params(model: nnx.Module, mesh: Mesh, which: Any = nnx.Param) -> dict[str, Any]:
    """Abstract variables `which` of a (possibly abstract) model, sharded on `mesh`."""
    shapes = nnx.to_pure_dict(nnx.state(model, which))
    return with_shardings(shapes, param_shardings(model, mesh, which))
