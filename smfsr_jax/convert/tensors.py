"""The tensors of every torch -> Flax converter: safetensors reading and writing, strict key and tree checks
(CheckpointError), torch -> Flax kernel layouts, flat and nested trees, rule-driven mapping of a state dict.

Pure numpy: torch is never imported. Tensors are read through a memory map so that multi-GB files
are not loaded whole; bfloat16 comes from ml_dtypes (a jax dependency).

Sources may be bucket URLs (gs://): a safetensors header is read from the bucket, the file is staged to local
scratch (core/files.stage) when its first tensor is read.
"""

import json
import os
import re
import struct
from typing import Callable, Iterable, Mapping

import ml_dtypes
import numpy as np

from smfsr_jax.core import errors, files

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


class CheckpointError(errors.UserError, ValueError):
    """A checkpoint does not match the network: names the file and every offending key."""


class SafetensorsFile(Mapping):
    """Read-only mapping key -> np.ndarray over one .safetensors file (memory-mapped, lazy). A file in a bucket
    is staged when its first tensor is read: names and shapes come from its header alone."""

    def __init__(self, path: str):
        self.path = str(path)
        size = files.size(self.path)
        raw = files.read_range(self.path, 0, 8)
        if len(raw) < 8:
            raise CheckpointError(f"{self.path}: not a safetensors file (only {size} bytes)")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > size - 8:
            raise CheckpointError(f"{self.path}: truncated safetensors header "
                                  f"(header says {header_len} bytes, file has {size - 8})")
        try:
            header = json.loads(files.read_range(self.path, 8, 8 + header_len))
        except ValueError as e:
            raise CheckpointError(f"{self.path}: unreadable safetensors header ({e})") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self._entries = header
        self._data_start = 8 + header_len
        data_size = size - self._data_start
        for key, entry in header.items():
            begin, end = entry["data_offsets"]
            if end > data_size:
                raise CheckpointError(f"{self.path}: truncated: tensor {key!r} ends at byte {end} "
                                      f"but the data section has {data_size} bytes")
            if entry["dtype"] not in _DTYPES:
                raise CheckpointError(f"{self.path}: tensor {key!r} has unsupported dtype {entry['dtype']}")
        self._mmap = None
        self._has_data = data_size > 0
        if not files.is_remote(self.path):
            self._map()

    def _map(self) -> np.memmap | None:
        """The file's bytes, memory-mapped; a file in a bucket is staged first."""
        if self._has_data and self._mmap is None:
            local = files.stage(self.path, what="safetensors' memory map")
            self._mmap = np.memmap(local, dtype=np.uint8, mode="r")
        return self._mmap

    def shape(self, key: str) -> tuple:
        return tuple(self._entries[key]["shape"])

    def __getitem__(self, key: str) -> np.ndarray:
        entry = self._entries[key]
        begin, end = entry["data_offsets"]
        dtype = _DTYPES[entry["dtype"]]
        buf = self._map()[self._data_start + begin:self._data_start + end]
        return np.frombuffer(buf, dtype=dtype).reshape(entry["shape"])

    def __iter__(self):
        return iter(self._entries)

    def __len__(self):
        return len(self._entries)


def read_safetensors(path: str) -> SafetensorsFile:
    return SafetensorsFile(path)


def write_safetensors(path: str, tensors: Mapping[str, np.ndarray], metadata: dict | None = None):
    """Minimal safetensors writer (used by tests to build broken checkpoints and by the converters)."""
    names = {np.dtype(v): k for k, v in _DTYPES.items()}
    header, offset, blobs = {}, 0, []
    for key, value in tensors.items():
        arr = np.ascontiguousarray(value)
        blob = arr.tobytes()
        header[key] = {"dtype": names[arr.dtype], "shape": list(arr.shape),
                       "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
        blobs.append(blob)
    if metadata:
        header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for blob in blobs:
            f.write(blob)


class MergedTensors(Mapping):
    """Several safetensors shards (diffusers `*.safetensors.index.json` layouts) seen as one mapping."""

    def __init__(self, files: Iterable[SafetensorsFile]):
        self.files = list(files)
        self.path = ", ".join(f.path for f in self.files)
        self._where = {}
        for f in self.files:
            for key in f:
                if key in self._where:
                    raise CheckpointError(f"{f.path}: tensor {key!r} also present in {self._where[key].path}")
                self._where[key] = f

    def shape(self, key):
        return self._where[key].shape(key)

    def __getitem__(self, key):
        return self._where[key][key]

    def __iter__(self):
        return iter(self._where)

    def __len__(self):
        return len(self._where)


def open_weights(path: str, pattern: str = "*.safetensors") -> Mapping:
    """A .safetensors file, or a directory holding one file or sharded files: those its one
    `*.safetensors.index.json` names (a missing shard is an error), else every .safetensors file."""
    if files.is_dir(path):
        listing = files.listdir(path)
        indexes = [n for n in listing if n.endswith(".safetensors.index.json")]
        names = sorted(n for n in listing if n.endswith(".safetensors"))
        if len(indexes) == 1:
            index = os.path.join(path, indexes[0])
            try:
                names = sorted(set(json.loads(files.read_text(index))["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise CheckpointError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from None
            missing = [n for n in names if not files.is_file(os.path.join(path, n))]
            if missing:
                raise CheckpointError(f"{index}: shard(s) {missing} are missing")
        if not names:
            raise CheckpointError(f"{path}: no .safetensors file in this directory")
        return MergedTensors(SafetensorsFile(os.path.join(path, n)) for n in names)
    if not files.exists(path):
        raise CheckpointError(f"{path}: no such file or directory")
    return SafetensorsFile(path)


def tensor_shape(tensors: Mapping, key: str) -> tuple:
    return tuple(tensors.shape(key)) if hasattr(tensors, "shape") else tuple(np.shape(tensors[key]))


def check_keys(source: str, tensors: Mapping, expected: Mapping[str, tuple], ignore: Iterable[str] = ()):
    """Strict check of a torch state dict against the expected {key: shape}.

    `ignore` holds regexes (full match) of keys that may be present and are dropped. Raises one
    CheckpointError listing every missing, unexpected and mis-shaped key.
    """
    ignore = [re.compile(p) for p in ignore]
    found = set(tensors)
    missing = sorted(set(expected) - found)
    unexpected = sorted(k for k in found - set(expected) if not any(p.fullmatch(k) for p in ignore))
    misshaped = [f"{k}: expected {tuple(expected[k])}, found {tensor_shape(tensors, k)}"
                 for k in sorted(found & set(expected)) if tensor_shape(tensors, k) != tuple(expected[k])]
    _raise_mismatch(f"{source}: checkpoint does not match the network", "key", missing, unexpected, misshaped)


def _raise_mismatch(title: str, noun: str, missing, unexpected, misshaped):
    if not (missing or unexpected or misshaped):
        return
    lines = [title]
    for kind, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        if items:
            lines.append(f"  {len(items)} {kind} {noun}(s):")
            lines.extend(f"    {k}" for k in items)
    raise CheckpointError("\n".join(lines))


# Per-tensor layout changes torch -> Flax.
def linear_kernel(w: np.ndarray) -> np.ndarray:
    """torch Linear weight (out, in) -> Flax Dense kernel (in, out)."""
    return np.asarray(w).T


def conv_kernel(w: np.ndarray) -> np.ndarray:
    """torch Conv weight (out, in, kh, kw) -> Flax Conv kernel (kh, kw, in, out)."""
    return np.asarray(w).transpose(2, 3, 1, 0)


def conv1x1_as_linear(w: np.ndarray) -> np.ndarray:
    """torch 1x1 conv (out, in, 1, 1) -> Dense kernel (in, out)."""
    w = np.asarray(w)
    return w.reshape(w.shape[0], w.shape[1]).T


def flatten(tree: Mapping, prefix: str = "") -> dict:
    """Nested dict -> {'a/b/c': leaf}."""
    out = {}
    for k, v in tree.items():
        path = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(flatten(v, path))
        else:
            out[path] = v
    return out


def unflatten(flat: Mapping[str, np.ndarray]) -> dict:
    """{'a/b/c': leaf} -> nested dict."""
    tree = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def check_tree(source: str, params: Mapping, expected: Mapping):
    """Strict check of a converted Flax tree against an abstract one (e.g. from jax.eval_shape)."""
    got = {k: tuple(np.shape(v)) for k, v in flatten(params).items()}
    want = {k: tuple(v.shape) for k, v in flatten(expected).items()}
    missing = sorted(set(want) - set(got))
    unexpected = sorted(set(got) - set(want))
    misshaped = [f"{k}: expected {want[k]}, found {got[k]}" for k in sorted(set(got) & set(want)) if got[k] != want[k]]
    _raise_mismatch(f"{source}: converted parameters do not match the network", "parameter",
                    missing, unexpected, misshaped)


def progress(iterable, total: int | None = None, desc: str = "", enabled: bool = True):
    if not enabled:
        return iterable
    from tqdm import tqdm
    return tqdm(iterable, total=total, desc=desc, unit="tensor", leave=False)


def map_tensors(tensors: Mapping, rules: Mapping[str, tuple[str, Callable]], dtype=np.float32,
                show_progress: bool = False, desc: str = "") -> dict:
    """Apply {torch_key: (flax_path, fn)} to a state dict; returns the flat Flax dict."""
    flat = {}
    for key, (path, fn) in progress(rules.items(), total=len(rules), desc=desc, enabled=show_progress):
        flat[path] = np.asarray(fn(np.asarray(tensors[key])), dtype=dtype)
    return flat


def convert_checked(source: str, tensors: Mapping, rules: Mapping[str, tuple[str, Callable]],
                    shapes: Mapping[str, tuple], abstract_params: Mapping) -> dict:
    """A torch state dict strictly checked against {key: shape}, mapped by `rules` and checked against the
    abstract Flax tree: the nested Flax params (numpy fp32)."""
    check_keys(source, tensors, shapes)
    params = unflatten(map_tensors(tensors, rules))
    check_tree(source, params, abstract_params)
    return params
