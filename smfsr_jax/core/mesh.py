"""Device meshes: one home for building a mesh and the batch / replicated shardings on it.

A mesh is given as [(axis name, size)]; one size may be -1 (all remaining devices), e.g. [("data", -1),
("fsdp", 1)]. Batches are split along their leading axis over every mesh axis.
"""

import math
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


def make_mesh(axes: Sequence[tuple[str, int]], devices=None) -> Mesh:
    devices = np.asarray(jax.devices() if devices is None else devices)
    names = [name for name, _ in axes]
    sizes = [int(size) for _, size in axes]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {axes}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        sizes[sizes.index(-1)] = devices.size // known
    if math.prod(sizes) != devices.size:
        raise ValueError(f"mesh {dict(zip(names, sizes))} does not cover the {devices.size} devices")
    return Mesh(devices.reshape(sizes), names)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(tuple(mesh.axis_names)))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
