"""Regex sharding rules for parameters and batches.

The mesh comes from the config as [(axis name, size)], one size may be -1 (all remaining devices), e.g.
[("data", -1), ("fsdp", 1)]. Parameter rules are [(regex, spec)], first match wins (re.search on the
'/'-joined path). A spec is "fsdp" (shard the largest dimension divisible by the fsdp axis, replicate
when none is), "replicate", or a tuple of mesh axis names / None per dimension. Batches are split
along their leading axis over every mesh axis.
"""

import math
import re

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from smfsr_jax.core.mesh import batch_sharding
from smfsr_jax.training.partition import tree_paths

DEFAULT_RULES = (("pos_embed/pos_embed", "replicate"), (".*", "fsdp"))


def _fsdp_spec(shape, mesh: Mesh, min_size: int) -> P:
    size = mesh.shape.get("fsdp", 1)
    if size == 1 or math.prod(shape) < min_size:
        return P()
    candidates = [i for i, d in enumerate(shape) if d % size == 0]
    if not candidates:
        return P()
    dim = max(candidates, key=lambda i: shape[i])
    return P(*[("fsdp" if i == dim else None) for i in range(len(shape))])


def param_specs(tree, mesh: Mesh, rules=DEFAULT_RULES, min_size: int = 2 ** 14):
    """PartitionSpecs for a (possibly abstract) parameter tree."""
    paths = tree_paths(tree)
    leaves, treedef = jax.tree.flatten(tree)
    specs = []
    for path, leaf in zip(paths, leaves):
        for pattern, spec in rules:
            if re.search(pattern, path):
                break
        else:
            spec = "replicate"
        if spec == "fsdp":
            specs.append(_fsdp_spec(np.shape(leaf), mesh, min_size))
        elif spec == "replicate":
            specs.append(P())
        else:
            specs.append(P(*spec))
    return jax.tree.unflatten(treedef, specs)


def param_shardings(tree, mesh: Mesh, rules=DEFAULT_RULES):
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), param_specs(tree, mesh, rules),
                        is_leaf=lambda x: isinstance(x, P))


def to_global_batch(local_batch: dict, mesh: Mesh) -> dict:
    """Process-local numpy arrays -> global jax arrays sharded along the batch axis (multi-host safe)."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}


def put(tree, shardings):
    """Place host arrays (numpy) onto devices with the given shardings (each process holds all values)."""
    return jax.tree.map(lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda idx: np.asarray(x)[idx]),
                        tree, shardings)
