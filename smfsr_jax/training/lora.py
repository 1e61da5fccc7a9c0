"""Low-rank adapters in parameter space: W_eff = W + (alpha / r) A B on selected Dense kernels.

The adapters are a separate tree mirroring the adapted kernels' paths, with `lora_a` (..., in, r) and
`lora_b` (..., r, out) in place of `kernel` (leading scan axes kept). `apply_lora` returns the frozen tree
with the adapted kernels, so the network itself needs no change.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np

from smfsr_jax.training.partition import tree_paths


def init_lora(params: dict, patterns, rank: int, rng) -> dict:
    """Adapters for every `.../kernel` whose path matches one of `patterns`: A ~ N(0, 1/r^2), B = 0."""
    flat = dict(zip(tree_paths(params), jax.tree.leaves(params)))
    targets = [p for p in flat if p.endswith("/kernel") and any(re.search(pat, p) for pat in patterns)]
    if not targets:
        raise ValueError(f"no kernel matches the LoRA targets {list(patterns)}")
    adapters = {}
    for i, path in enumerate(sorted(targets)):
        *lead, fan_in, fan_out = flat[path].shape
        a = jax.random.normal(jax.random.fold_in(rng, i), (*lead, fan_in, rank)) / rank
        node = adapters
        for key in path.split("/")[:-1]:
            node = node.setdefault(key, {})
        node["lora_a"] = np.asarray(a, np.float32)
        node["lora_b"] = np.zeros((*lead, rank, fan_out), np.float32)
    return adapters


def apply_lora(params: dict, adapters: dict, alpha: float, rank: int) -> dict:
    """`params` with kernel += (alpha / rank) lora_a @ lora_b wherever `adapters` has an entry."""
    out = {}
    for key, value in params.items():
        sub = adapters.get(key)
        if sub is None:
            out[key] = value
        elif "lora_a" in sub:
            delta = jnp.matmul(sub["lora_a"], sub["lora_b"]) * (alpha / rank)
            out[key] = {**value, "kernel": value["kernel"] + delta.astype(value["kernel"].dtype)}
        else:
            out[key] = apply_lora(value, sub, alpha, rank)
    return out
