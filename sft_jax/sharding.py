"""Device mesh and the one table that maps logical axis names to mesh axes."""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sft_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis (as annotated on parameters and activations) -> mesh axes it is split over.
# "batch" rows are split over data-parallel and fsdp replicas; weights are split over fsdp
# (gathered per layer by XLA) and tensor (Megatron-style column/row parallel layers).
LOGICAL_RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "vocab": ("tensor",),
    "embed": ("fsdp",),
    "mlp": ("tensor",),
    "q_heads": ("tensor",),
    "kv_heads": ("tensor",),
    "norm": (),
    "lora_rank": (),
    "length": (),
}


def make_mesh(
    data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (all by default); one -1 fills the rest."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
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
            f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} needs "
            f"{math.prod(sizes)} devices, but {len(devices)} are available."
        )
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def single_device_mesh() -> Mesh:
    return make_mesh(1, 1, 1, devices=jax.devices()[:1])


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
