"""Regex-driven split of a parameter tree into trainable and frozen parts (big_vision style).

Paths are '/'-joined tree keys, e.g. 'dual_blocks/attn/to_q_control/kernel'. A leaf is trainable when
some `trainable` regex matches (re.search) and no `exclude` regex does. The two parts are disjoint
nested dicts; `merge` puts them back together for `apply`.
"""

import re
from typing import Iterable, Mapping

import jax
import numpy as np


def _key_name(entry) -> str:
    for attr in ("key", "name", "idx"):  # DictKey, GetAttrKey, SequenceKey
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def tree_paths(tree) -> list[str]:
    """'/'-joined key paths of every leaf, in flatten order (dicts, dataclasses, tuples alike)."""
    return ["/".join(_key_name(k) for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _select(tree: Mapping, keep, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        path = f"{prefix}/{key}" if prefix else key
        if isinstance(value, Mapping):
            sub = _select(value, keep, path)
            if sub:
                out[key] = sub
        elif keep(path):
            out[key] = value
    return out


def is_trainable(path: str, trainable: Iterable[str], exclude: Iterable[str] = ()) -> bool:
    return any(re.search(p, path) for p in trainable) and not any(re.search(p, path) for p in exclude)


def partition(params: Mapping, trainable: Iterable[str], exclude: Iterable[str] = ()) -> tuple[dict, dict]:
    """(trainable part, frozen part) of a nested parameter dict."""
    trainable, exclude = tuple(trainable), tuple(exclude)
    keep = lambda path: is_trainable(path, trainable, exclude)  # noqa: E731
    return _select(params, keep), _select(params, lambda path: not keep(path))


def merge(*trees: Mapping) -> dict:
    """Union of disjoint nested dicts (raises on a leaf present twice)."""
    out: dict = {}
    for tree in trees:
        for key, value in tree.items():
            if key not in out:
                out[key] = value
            elif isinstance(out[key], Mapping) and isinstance(value, Mapping):
                out[key] = merge(out[key], value)
            else:
                raise ValueError(f"parameter {key!r} is present in two parts")
    return out


def count(tree) -> int:
    return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(tree)))


def cast(tree, dtype, keep: Iterable[str] = ()):
    """Cast floating leaves (frozen parts may be held in bf16), except those whose path matches `keep`;
    ShapeDtypeStruct leaves get the new dtype alike."""
    keep = tuple(keep)

    def leaf(path, x):
        name = "/".join(_key_name(k) for k in path)
        if not np.issubdtype(x.dtype, np.floating) or any(re.search(p, name) for p in keep):
            return x
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(x.shape, dtype)
        return x.astype(dtype)

    return jax.tree_util.tree_map_with_path(leaf, tree)
