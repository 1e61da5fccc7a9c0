"""torch checkpoint reader: files written by the real torch, read back without torch."""

import collections
import io
import os
import pickle
import struct
import zipfile

import ml_dtypes
import numpy as np
import pytest

from smfsr_jax.convert.tensors import CheckpointError
from smfsr_jax.convert.torch_pickle import load_state_dict, load_torch_file, torchscript_state_dict
from tests.conftest import import_torch


def _as_numpy(torch, t):
    if t.dtype == torch.bfloat16:
        return t.detach().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.detach().numpy()


def _sample_tensors(torch):
    """Every storage dtype we read, plus views that are not contiguous or do not start at offset 0."""
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(6, 10, generator=gen)
    shared = torch.arange(24, dtype=torch.int64)
    return collections.OrderedDict([
        ("float32", torch.randn(3, 4, 5, generator=gen)),
        ("float16", torch.randn(7, generator=gen).half()),
        ("bfloat16", torch.randn(2, 3, generator=gen).bfloat16()),
        ("int64", shared),
        ("uint8", torch.randint(0, 255, (4, 4), generator=gen, dtype=torch.uint8)),
        ("bool", torch.rand(5, generator=gen) > 0.5),
        ("transposed", base.t()),
        ("offset_slice", base[2:5, 3:8]),
        ("strided", base[::2, 1::3]),
        ("shared_view", shared[5:17].view(3, 4)),
        ("scalar", torch.tensor(3.5)),
        ("empty", torch.zeros(0, 3)),
        ("parameter", torch.nn.Parameter(torch.randn(2, 2, generator=gen))),
    ])


def _check_same(torch, loaded, reference):
    assert list(loaded) == list(reference)
    for key, tensor in reference.items():
        expected = _as_numpy(torch, tensor)
        assert isinstance(loaded[key], np.ndarray), key
        assert loaded[key].dtype == expected.dtype, key
        assert loaded[key].shape == expected.shape, key
        np.testing.assert_array_equal(loaded[key], expected, err_msg=key)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_state_dict_round_trip(tmp_path, zip_format):
    torch = import_torch()
    tensors = _sample_tensors(torch)
    path = tmp_path / "weights.pth"
    torch.save(tensors, path, _use_new_zipfile_serialization=zip_format)
    loaded = load_torch_file(path)
    assert isinstance(loaded, collections.OrderedDict)
    _check_same(torch, loaded, tensors)


def test_nested_structure_and_bare_tensor(tmp_path):
    torch = import_torch()
    embeds = torch.randn(1, 5, 8, dtype=torch.float32)
    torch.save(embeds, tmp_path / "NULL_prompt_embeds.pt")
    np.testing.assert_array_equal(load_torch_file(tmp_path / "NULL_prompt_embeds.pt"), embeds.numpy())

    nested = {"epoch": 3, "name": "run", "lr": [1e-4, 2e-4], "shape": (1, 2), "blob": b"\x00\x01",
              "params": {"a": torch.ones(2)}, "tensors": [torch.zeros(1), torch.arange(3)]}
    torch.save(nested, tmp_path / "nested.pth")
    loaded = load_torch_file(tmp_path / "nested.pth")
    assert (loaded["epoch"], loaded["name"], loaded["lr"], loaded["shape"], loaded["blob"]) == (
        3, "run", [1e-4, 2e-4], (1, 2), b"\x00\x01")
    np.testing.assert_array_equal(loaded["params"]["a"], np.ones(2, np.float32))
    np.testing.assert_array_equal(loaded["tensors"][1], np.arange(3))


def test_deflated_archive(tmp_path):
    """A torch archive re-zipped with compression (torch itself stores records uncompressed)."""
    torch = import_torch()
    tensors = _sample_tensors(torch)
    torch.save(tensors, tmp_path / "stored.pth")
    with zipfile.ZipFile(tmp_path / "stored.pth") as src, \
            zipfile.ZipFile(tmp_path / "deflated.pth", "w", zipfile.ZIP_DEFLATED) as dst:
        for name in src.namelist():
            dst.writestr(name, src.read(name))
    _check_same(torch, load_torch_file(tmp_path / "deflated.pth"), tensors)


def _write_legacy_v1(path, arrays):
    """A pre-1.0 legacy file (torchvision's 2017 weights): tensors rebuilt by `_rebuild_tensor`
    (version 1), written here with the plain pickle module from the format's definition."""
    torch = import_torch()

    class StorageRef:
        def __init__(self, key, numel):
            self.key, self.numel = key, numel

    class TensorV1:
        def __init__(self, key, array):
            self.storage, self.shape = StorageRef(key, array.size), array.shape
            self.stride = tuple(s // array.itemsize for s in array.strides)

        def __reduce__(self):
            return torch._utils._rebuild_tensor, (self.storage, 0, self.shape, self.stride)

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, StorageRef):
                return ("storage", torch.FloatStorage, obj.key, "cpu", obj.numel, None)
            return None

    state = collections.OrderedDict((name, TensorV1(str(i), a)) for i, (name, a) in enumerate(arrays.items()))
    buf = io.BytesIO()
    for header in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True}):
        pickle.dump(header, buf, protocol=2)
    Pickler(buf, protocol=2).dump(state)
    pickle.dump(sorted(str(i) for i in range(len(arrays))), buf, protocol=2)
    for key in sorted(str(i) for i in range(len(arrays))):
        array = list(arrays.values())[int(key)]
        buf.write(struct.pack("<q", array.size) + np.ascontiguousarray(array, np.float32).tobytes())
    path.write_bytes(buf.getvalue())


def test_legacy_rebuild_tensor_v1(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {f"features.{i}.weight": rng.standard_normal((3, 2, 2, 2)).astype(np.float32) for i in range(12)}
    _write_legacy_v1(tmp_path / "alexnet-like.pth", arrays)
    loaded = load_state_dict(tmp_path / "alexnet-like.pth")
    assert list(loaded) == list(arrays)
    for key in arrays:
        np.testing.assert_array_equal(loaded[key], arrays[key])


class _Net:
    @staticmethod
    def make(torch):
        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = torch.nn.Conv2d(3, 4, 3)
                self.conv_nobias = torch.nn.Conv2d(4, 4, 1, bias=False)
                self.bn = torch.nn.BatchNorm2d(4)
                self.blocks = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.GELU(), torch.nn.Linear(4, 2))
                self.register_buffer("scale", torch.arange(4, dtype=torch.float32))
                self.plain_attribute = torch.ones(2)  # neither parameter nor buffer

            def forward(self, x):
                x = self.bn(self.conv_nobias(self.conv(x))) * self.scale[None, :, None, None]
                return self.blocks(x.mean((2, 3))) + self.plain_attribute.sum()

        torch.manual_seed(0)
        return Net().eval()


@pytest.mark.parametrize("mode", ["script", "trace"])
def test_torchscript_state_dict(tmp_path, mode):
    torch = import_torch()
    net = _Net.make(torch)
    scripted = torch.jit.script(net) if mode == "script" else torch.jit.trace(net, torch.zeros(1, 3, 8, 8))
    path = tmp_path / "RN50-like.pt"
    torch.jit.save(scripted, path)
    reference = torch.jit.load(path).state_dict()
    for loaded in (torchscript_state_dict(path), load_state_dict(path)):
        _check_same(torch, loaded, reference)
    assert "plain_attribute" not in torchscript_state_dict(path)


def test_load_state_dict_unwraps(tmp_path):
    torch = import_torch()
    weights = {"layer.weight": torch.randn(2, 2), "layer.bias": torch.zeros(2)}
    cases = {
        "plain": weights,
        "state_dict": {"state_dict": weights, "epoch": 1},
        "params": {"params": weights, "params_ema": {"other": torch.ones(1)}},
        "data_parallel": {"model": {f"module.{k}": v for k, v in weights.items()}, "optimizer": {"lr": 0.1}},
    }
    for name, obj in cases.items():
        torch.save(obj, tmp_path / f"{name}.pth")
        _check_same(torch, load_state_dict(tmp_path / f"{name}.pth"), weights)

    torch.save({"epoch": 3, "notes": "no tensors"}, tmp_path / "none.pth")
    with pytest.raises(CheckpointError, match=r"none\.pth: no state dict.*epoch"):
        load_state_dict(tmp_path / "none.pth")


def test_rejects_code_and_bad_files(tmp_path):
    torch = import_torch()

    class Exploit:
        def __reduce__(self):
            return os.system, ("echo pwned",)

    torch.save({"x": Exploit()}, tmp_path / "exploit.pth")
    with pytest.raises(CheckpointError, match=r"exploit\.pth: .*(posix|os)\.system"):
        load_torch_file(tmp_path / "exploit.pth")

    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pth")
    with pytest.raises(CheckpointError, match=r"module\.pth: .*torch\.nn\.modules\.linear\.Linear"):
        load_torch_file(tmp_path / "module.pth")

    torch.save(_sample_tensors(torch), tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    raw = (tmp_path / "legacy.pth").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(raw[:-40])
    with pytest.raises(CheckpointError, match=r"truncated\.pth: storage .* truncated"):
        load_torch_file(tmp_path / "truncated.pth")

    (tmp_path / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    with pytest.raises(CheckpointError, match=r"image\.png: not a torch checkpoint"):
        load_torch_file(tmp_path / "image.png")

    (tmp_path / "cut.pth").write_bytes(raw[:100])
    with pytest.raises(CheckpointError, match=r"cut\.pth: unreadable pickle"):
        load_torch_file(tmp_path / "cut.pth")

    with pytest.raises(CheckpointError, match=r"missing\.pth: no such file"):
        load_torch_file(tmp_path / "missing.pth")
