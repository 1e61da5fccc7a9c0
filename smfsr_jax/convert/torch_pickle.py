"""Numpy-only reader of torch checkpoint files (torch is never imported).

Formats:
  * zip archives written by `torch.save` (torch >= 1.6): `<prefix>/data.pkl` plus one raw record
    `<prefix>/data/<key>` per storage;
  * the legacy format of `torch.save(..., _use_new_zipfile_serialization=False)` and of files written
    before torch 1.6 (torchvision's `alexnet-owt-7be5be79.pth`, `vgg16-397923af.pth`): five pickles in a
    row (magic number, protocol, sys info, the object, the storage keys) followed by the raw storages;
  * TorchScript archives written by `torch.jit.save` (OpenAI's `RN50.pt`): `data.pkl` holds
    `__torch__.*` module objects; `code/` declares which attributes are parameters and buffers.

Unpickling goes through an allow-list: tensors, storages, dtypes, OrderedDict and a few inert
containers. Any other global (a pickled nn.Module, a custom class, `os.system`) raises a
CheckpointError naming the file, so no code from the file is ever run.
"""

import argparse
import codecs
import collections
import contextlib
import dataclasses
import os
import pickle
import re
import struct
import zipfile
from typing import Callable, Mapping

import ml_dtypes
import numpy as np

from smfsr_jax.convert import converted_dir
from smfsr_jax.convert.tensors import CheckpointError
from smfsr_jax.core import files

_LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL_VERSION = 1001
_ZIP_MAGIC = b"PK\x03\x04"
_ZIP_LOCAL_HEADER_SIZE = 30

_STORAGE_DTYPES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
    "ComplexFloatStorage": np.complex64, "ComplexDoubleStorage": np.complex128, "UntypedStorage": np.uint8,
}
_TORCH_DTYPES = {
    "float64": np.float64, "float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16,
    "int64": np.int64, "int32": np.int32, "int16": np.int16, "int8": np.int8, "uint8": np.uint8,
    "bool": np.bool_, "complex64": np.complex64, "complex128": np.complex128,
    "float8_e4m3fn": ml_dtypes.float8_e4m3fn, "float8_e5m2": ml_dtypes.float8_e5m2,
}
# Inert globals found in ordinary checkpoints besides tensors (protocol-2 bytes, training args).
_SAFE_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("_codecs", "encode"): codecs.encode,
    ("argparse", "Namespace"): argparse.Namespace,
}


class TorchScriptObject:
    """An object of a TorchScript class (`__torch__.*`); `state` holds its pickled attributes."""

    type_name = ""

    def __setstate__(self, state):
        self.state = state


class _StorageType:
    """Stands for `torch.FloatStorage` and friends: only the element dtype matters."""

    def __init__(self, dtype):
        self.dtype = np.dtype(dtype)


class _Storage:
    """One torch storage of `numel` elements: a flat array (memory-mapped where possible), or None while
    only the metadata is being read (first pass over a legacy file)."""

    def __init__(self, dtype, numel, elements):
        self.dtype = np.dtype(dtype)
        self.numel = numel
        self.elements = elements


def _restore_type_tag(value, type_str=None):
    return value


_TORCHSCRIPT_GLOBALS = {
    ("torch.jit._pickle", "restore_type_tag"): _restore_type_tag,
    ("torch.jit._pickle", "build_intlist"): list,
    ("torch.jit._pickle", "build_doublelist"): list,
    ("torch.jit._pickle", "build_boollist"): list,
    ("torch.jit._pickle", "build_tensorlist"): list,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler whose only globals are tensor rebuilders and inert containers.

    `load_storage(key, dtype, numel)` returns the flat array of one storage (or None in a metadata-only
    pass); `storages` maps the keys seen to their _Storage.
    """

    def __init__(self, file, path: str, load_storage):
        super().__init__(file, encoding="utf-8")
        self.path = path
        self.load_storage = load_storage
        self.storages = {}
        self.script_classes = {}

    def find_class(self, module, name):
        if (module, name) in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[(module, name)]
        if (module, name) in _TORCHSCRIPT_GLOBALS:
            return _TORCHSCRIPT_GLOBALS[(module, name)]
        if module == "torch._utils" and name in ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3",
                                                 "_rebuild_parameter", "_rebuild_parameter_with_state"):
            return getattr(self, name)
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module == "torch" and name in _TORCH_DTYPES:
            return np.dtype(_TORCH_DTYPES[name])
        if module == "__torch__" or module.startswith("__torch__."):
            return self._script_class(f"{module}.{name}")
        raise CheckpointError(f"{self.path}: the pickle refers to {module}.{name}, which this reader does not "
                              "load (only tensors, storages and plain containers are allowed; save a state_dict)")

    def persistent_load(self, saved_id):
        if not (isinstance(saved_id, tuple) and saved_id and saved_id[0] == "storage"):
            raise CheckpointError(f"{self.path}: unknown persistent id {saved_id!r}")
        storage_type, key, _, numel = saved_id[1:5]
        view_metadata = saved_id[5] if len(saved_id) > 5 else None
        if not isinstance(storage_type, _StorageType):
            raise CheckpointError(f"{self.path}: storage {key!r} has unknown type {storage_type!r}")
        key = str(key)
        if key not in self.storages:
            elements = self.load_storage(key, storage_type.dtype, numel)
            self.storages[key] = _Storage(storage_type.dtype, numel, elements)
        storage = self.storages[key]
        if view_metadata is None:
            return storage
        # Storage views exist only in files from torch < 0.4.
        _, view_offset, view_numel = view_metadata
        elements = storage.elements
        return _Storage(storage.dtype, view_numel,
                        None if elements is None else elements[view_offset:view_offset + view_numel])

    def _script_class(self, type_name):
        if type_name not in self.script_classes:
            self.script_classes[type_name] = type(type_name.rsplit(".", 1)[-1], (TorchScriptObject,),
                                                  {"type_name": type_name})
        return self.script_classes[type_name]

    def _tensor(self, storage, storage_offset, size, stride, dtype=None):
        if not isinstance(storage, _Storage):
            raise CheckpointError(f"{self.path}: a tensor refers to {storage!r} instead of a storage")
        if storage.elements is None:
            return None
        flat = storage.elements if dtype is None else storage.elements.view(np.uint8).view(dtype)
        size, stride = tuple(size), tuple(stride)
        if len(size) != len(stride):
            raise CheckpointError(f"{self.path}: tensor of size {size} has strides {stride}")
        if 0 in size:
            return np.zeros(size, flat.dtype)
        last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
        if storage_offset < 0 or min(stride, default=0) < 0 or last >= flat.size:
            raise CheckpointError(f"{self.path}: tensor of size {size}, stride {stride} at offset "
                                  f"{storage_offset} overruns its storage of {flat.size} elements")
        view = np.lib.stride_tricks.as_strided(flat[storage_offset:], shape=size,
                                               strides=[s * flat.itemsize for s in stride])
        return np.array(view)  # a copy: contiguous and detached from the file

    def _rebuild_tensor(self, storage, storage_offset, size, stride):
        return self._tensor(storage, storage_offset, size, stride)

    def _rebuild_tensor_v2(self, storage, storage_offset, size, stride, requires_grad, backward_hooks,
                           metadata=None):
        return self._tensor(storage, storage_offset, size, stride)

    def _rebuild_tensor_v3(self, storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype,
                           metadata=None):
        return self._tensor(storage, storage_offset, size, stride, dtype)

    def _rebuild_parameter(self, data, requires_grad, backward_hooks):
        return data

    def _rebuild_parameter_with_state(self, data, requires_grad, backward_hooks, state):
        return data


def _unpickle(file, path: str, load_storage):
    unpickler = _RestrictedUnpickler(file, path, load_storage)
    try:
        return unpickler.load(), unpickler
    except CheckpointError:
        raise
    except Exception as e:  # a truncated or corrupt pickle
        raise CheckpointError(f"{path}: unreadable pickle ({type(e).__name__}: {e})") from None


def _is_zip(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == _ZIP_MAGIC


def _is_pickle(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(1) == pickle.PROTO


def _open_zip(path: str) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
        raise CheckpointError(f"{path}: corrupt zip archive ({e})") from None


def _archive_prefix(path: str, archive: zipfile.ZipFile) -> str:
    """The top folder holding data.pkl ('archive/' for torch.save, the file stem for older files)."""
    prefixes = [n[:-len("data.pkl")] for n in archive.namelist()
                if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(prefixes) != 1:
        raise CheckpointError(f"{path}: a torch zip archive has exactly one <name>/data.pkl, found {len(prefixes)}")
    return prefixes[0]


def _zip_record(path: str, archive: zipfile.ZipFile, file_map: np.ndarray, name: str) -> np.ndarray:
    """The bytes of one archive member: a view of the memory-mapped file when stored uncompressed, as
    torch writes them."""
    try:
        info = archive.getinfo(name)
    except KeyError:
        raise CheckpointError(f"{path}: the archive has no record {name}") from None
    if info.compress_type != zipfile.ZIP_STORED:
        return np.frombuffer(archive.read(name), np.uint8)
    header = file_map[info.header_offset:info.header_offset + _ZIP_LOCAL_HEADER_SIZE].tobytes()
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    start = info.header_offset + _ZIP_LOCAL_HEADER_SIZE + name_len + extra_len
    return file_map[start:start + info.file_size]


def _load_zip(path: str, archive: zipfile.ZipFile, prefix: str):
    byteorder = archive.read(prefix + "byteorder") if prefix + "byteorder" in archive.namelist() else b"little"
    if byteorder != b"little":
        raise CheckpointError(f"{path}: storages are {byteorder.decode()}-endian; only little-endian is supported")
    file_map = np.memmap(path, dtype=np.uint8, mode="r")

    def load_storage(key, dtype, numel):
        raw = _zip_record(path, archive, file_map, f"{prefix}data/{key}")
        if raw.size != numel * dtype.itemsize:
            raise CheckpointError(f"{path}: storage {key} holds {raw.size} bytes, expected {numel} x {dtype}")
        return raw.view(dtype)

    with archive.open(prefix + "data.pkl") as f:
        root, _ = _unpickle(f, path, load_storage)
    return root


def _load_legacy(path: str):
    """Two passes: storage dtypes are only known from the object pickle, which precedes the raw data."""
    with open(path, "rb") as f:
        header = []
        for _ in range(3):
            header.append(_unpickle(f, path, None)[0])
        magic, protocol, sys_info = header
        if magic != _LEGACY_MAGIC_NUMBER or protocol != _LEGACY_PROTOCOL_VERSION:
            raise CheckpointError(f"{path}: not a torch checkpoint (neither a zip archive nor the legacy "
                                  "magic number and protocol)")
        if not sys_info.get("little_endian", True):
            raise CheckpointError(f"{path}: storages are big-endian; only little-endian is supported")
        object_start = f.tell()
        _, metadata_pass = _unpickle(f, path, lambda key, dtype, numel: None)
        storage_keys, _ = _unpickle(f, path, None)
        data_start = f.tell()

    size = os.path.getsize(path)
    file_map = np.memmap(path, dtype=np.uint8, mode="r") if size > data_start else np.zeros(0, np.uint8)
    elements, offset = {}, data_start
    for key in storage_keys:
        key = str(key)
        if key not in metadata_pass.storages:
            raise CheckpointError(f"{path}: storage {key} is listed but no tensor uses it")
        dtype, numel = metadata_pass.storages[key].dtype, metadata_pass.storages[key].numel
        if offset + 8 > size:
            raise CheckpointError(f"{path}: storage {key} is truncated (the file ends before it)")
        (stored_numel,) = struct.unpack("<q", file_map[offset:offset + 8].tobytes())
        end = offset + 8 + stored_numel * dtype.itemsize
        if stored_numel != numel or end > size:
            raise CheckpointError(f"{path}: storage {key} is truncated or has {stored_numel} elements "
                                  f"where the pickle says {numel}")
        elements[key] = file_map[offset + 8:end].view(dtype)
        offset = end

    def load_storage(key, dtype, numel):
        if key not in elements:
            raise CheckpointError(f"{path}: storage {key} is used but not stored")
        return elements[key]

    with open(path, "rb") as f:
        f.seek(object_start)
        root, _ = _unpickle(f, path, load_storage)
    return root


@contextlib.contextmanager
def _local_file(path: str):
    """`path` as a local file: a file in a bucket is staged (zip archives and memory maps need a local file), and a
    CheckpointError about the staged copy names the bucket URL."""
    if not files.is_file(path):
        raise CheckpointError(f"{path}: no such file")
    if not files.is_remote(path):
        yield path
        return
    local = files.stage(path, what="the torch checkpoint reader")
    try:
        yield local
    except CheckpointError as e:
        raise CheckpointError(str(e).replace(local, path)) from None


def load_torch_file(path) -> object:
    """Unpickle a torch checkpoint with every tensor as a numpy array.

    State dicts come back as (Ordered)dicts of arrays, bare tensors as arrays, TorchScript archives as
    TorchScriptObject trees (see torchscript_state_dict for their parameters).
    """
    with _local_file(str(path)) as path:
        if _is_pickle(path):
            return _load_legacy(path)
        if not _is_zip(path):
            raise CheckpointError(f"{path}: not a torch checkpoint (neither a zip archive nor a pickle)")
        with _open_zip(path) as archive:
            return _load_zip(path, archive, _archive_prefix(path, archive))


def _script_class_members(archive: zipfile.ZipFile, prefix: str) -> dict:
    """{qualified class name: parameter and buffer names} from the `__parameters__` and `__buffers__`
    lines that TorchScript writes into code/<module path>.py for every module class."""
    members = {}
    code_dir = prefix + "code/"
    for name in archive.namelist():
        if not (name.startswith(code_dir) and name.endswith(".py")):
            continue
        module = name[len(code_dir):-len(".py")].replace("/", ".")
        class_name = None
        for line in archive.read(name).decode("utf-8").splitlines():
            match = re.match(r"class (\w+)\b", line)
            if match:
                class_name = f"{module}.{match.group(1)}"
                members[class_name] = []
                continue
            match = re.match(r"\s+__(parameters|buffers)__ = \[(.*)\]", line)
            if match and class_name is not None:
                members[class_name].extend(re.findall(r'"([^"]*)"', match.group(2)))
    return members


def _flatten_script_module(path: str, obj: TorchScriptObject, members: Mapping, prefix: str, out: dict):
    if obj.type_name not in members:
        raise CheckpointError(f"{path}: TorchScript class {obj.type_name} has no definition under code/")
    state = obj.state if isinstance(obj.state, Mapping) else {}
    for name in members[obj.type_name]:
        if state.get(name) is not None:  # optional parameters (bias=None) are absent from state_dict
            out[prefix + name] = state[name]
    for name, value in state.items():
        if isinstance(value, TorchScriptObject):
            _flatten_script_module(path, value, members, f"{prefix}{name}.", out)


def torchscript_state_dict(path) -> dict[str, np.ndarray]:
    """{dotted.name: array} of a TorchScript archive's parameters and buffers, as its state_dict()."""
    with _local_file(str(path)) as path:
        if not _is_zip(path):
            raise CheckpointError(f"{path}: not a TorchScript (zip) archive")
        with _open_zip(path) as archive:
            prefix = _archive_prefix(path, archive)
            root = _load_zip(path, archive, prefix)
            if not isinstance(root, TorchScriptObject):
                raise CheckpointError(f"{path}: a torch.save file, not a TorchScript archive (use load_state_dict)")
            members = _script_class_members(archive, prefix)
        out = {}
        _flatten_script_module(path, root, members, "", out)
    return out


_STATE_DICT_WRAPPER_KEYS = ("state_dict", "params", "params_ema", "model", "model_state_dict", "net", "network")


def _is_state_dict(obj) -> bool:
    return (isinstance(obj, Mapping) and len(obj) > 0
            and all(isinstance(k, str) and isinstance(v, np.ndarray) for k, v in obj.items()))


def _find_state_dict(obj, depth: int = 0):
    if _is_state_dict(obj):
        return obj
    if isinstance(obj, Mapping) and depth < 3:
        for key in _STATE_DICT_WRAPPER_KEYS:
            if key in obj:
                found = _find_state_dict(obj[key], depth + 1)
                if found is not None:
                    return found
    return None


def load_state_dict(path) -> dict[str, np.ndarray]:
    """The {name: array} state dict of a checkpoint, found inside the usual wrappers
    ({'state_dict': ...}, {'params': ...}, {'model': ...}); DataParallel's 'module.' prefix is dropped when
    every key has it. TorchScript archives give their parameters and buffers."""
    with _local_file(str(path)) as path:
        if _is_zip(path):
            with _open_zip(path) as archive:
                is_script = any(n.startswith(_archive_prefix(path, archive) + "code/") for n in archive.namelist())
            if is_script:
                return torchscript_state_dict(path)
        obj = load_torch_file(path)
        state_dict = _find_state_dict(obj)
        if state_dict is None:
            found = sorted(map(str, obj)) if isinstance(obj, Mapping) else type(obj).__name__
            raise CheckpointError(f"{path}: no state dict of tensors found (looked at the top level and under "
                                  f"{', '.join(_STATE_DICT_WRAPPER_KEYS)}); top level: {found}")
    if all(k.startswith("module.") for k in state_dict):
        return {k[len("module."):]: v for k, v in state_dict.items()}
    return dict(state_dict)


def convert_torch_file(src, dst, converter: str, config, convert_state_dict: Callable):
    """A torch checkpoint file `src` -> a converted directory `dst`: `convert_state_dict(tensors, config,
    source=src)` saved with the dataclass `config` and a meta naming the converter and the source.
    Returns `config`."""
    src = os.fspath(src)
    params = convert_state_dict(load_state_dict(src), config, source=src)
    converted_dir.save_converted(dst, dataclasses.asdict(config), params,
                                 meta={"converter": converter, "source": files.absolute(src)})
    return config
