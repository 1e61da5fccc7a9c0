"""LPIPS v0.1 (AlexNet / VGG16): converter + Flax model vs a plain torch reference, and vs lpips/pyiqa goldens."""

import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from smfsr_jax.convert.lpips import (convert, lin_shapes, load_lpips, load_lpips_from, params_from_state_dicts,
                                     trunk_shapes)
from smfsr_jax.convert.tensors import CheckpointError
from smfsr_jax.convert.torch_pickle import load_state_dict
from smfsr_jax.evaluation.metrics import load_lpips_alex
from smfsr_jax.models.lpips import LPIPS, LPIPSConfig, unit_normalize
from tests.conftest import import_torch
from tools.make_metric_goldens import random_image_pairs, random_state_dict

GOLDENS = pathlib.Path(__file__).parent / "golden" / "lpips_psnr_ssim.json"


@functools.partial(jax.jit, static_argnames="net")
def _distance(params, a, b, net):
    """One compile per (net, shape), shared by the tests below."""
    return LPIPS(LPIPSConfig(net)).apply({"params": params}, a, b)


def _golden_inputs(golden):
    """The golden image pairs (uint8) mapped to [-1, 1] as pyiqa does: x / 255 * 2 - 1 in float32."""
    sr, hr = random_image_pairs(golden["seed"], *golden["image_size"])
    return sr / np.float32(255) * 2 - 1, hr / np.float32(255) * 2 - 1


def _torch_features(torch, net):
    """torchvision `features` of AlexNet / VGG16, written out, and the indices of the tapped ReLUs."""
    nn = torch.nn
    if net == "alex":
        layers = [nn.Conv2d(3, 64, 11, 4, 2), nn.ReLU(), nn.MaxPool2d(3, 2),
                  nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
                  nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(),
                  nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(),
                  nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2)]
        return nn.Sequential(*layers), (1, 4, 7, 9, 11)
    layers, in_channels = [], 3
    for item in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"):
        if item == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(in_channels, item, 3, padding=1), nn.ReLU()]
            in_channels = item
    return nn.Sequential(*layers), (3, 8, 15, 22, 29)


def _torch_lpips(torch, features, taps, lins, a, b):
    """LPIPS v0.1 of NCHW images in [-1, 1], straight from the definition (Zhang et al. 2018)."""
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def tapped(x):
        x, outs = (x - shift) / scale, []
        for i, layer in enumerate(features[:max(taps) + 1]):
            x = layer(x)
            if i in taps:
                outs.append(x)
        return outs

    total = 0
    for lin, fa, fb in zip(lins, tapped(a), tapped(b)):
        na = fa / (torch.sqrt((fa ** 2).sum(1, keepdim=True)) + 1e-10)
        nb = fb / (torch.sqrt((fb ** 2).sum(1, keepdim=True)) + 1e-10)
        total = total + lin((na - nb) ** 2).mean((2, 3))
    return total.flatten()


def _torch_setup(torch, net, tmp_path):
    """Seeded torch trunk + lin heads, saved as torchvision (legacy format) and lpips (zip) files."""
    torch.manual_seed(0)
    features, taps = _torch_features(torch, net)
    channels = (64, 192, 384, 256, 256) if net == "alex" else (64, 128, 256, 512, 512)
    lins = [torch.nn.Conv2d(c, 1, 1, bias=False) for c in channels]
    for lin in lins:
        torch.nn.init.uniform_(lin.weight, 0.0, 1.0)
    trunk_state = {f"features.{k}": v for k, v in features.state_dict().items()}
    trunk_state["classifier.1.weight"] = torch.randn(4, 4)  # present in torchvision files, ignored
    trunk_path, lin_path = tmp_path / f"{net}_trunk.pth", tmp_path / f"{net}_lin.pth"
    torch.save(trunk_state, trunk_path, _use_new_zipfile_serialization=False)
    torch.save({f"lin{i}.model.1.weight": lin.weight for i, lin in enumerate(lins)}, lin_path)
    return features, taps, lins, trunk_path, lin_path


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_parity_with_torch_reference(tmp_path, net):
    torch = import_torch()
    features, taps, lins, trunk_path, lin_path = _torch_setup(torch, net, tmp_path)
    _, params = load_lpips(net, trunk_path, lin_path)
    a, b = _golden_inputs(json.loads(GOLDENS.read_text())["lpips"][net])  # pairs 0, 1 differ; pair 2 equal
    with torch.no_grad():
        expected = _torch_lpips(torch, features, taps, lins, torch.from_numpy(a).permute(0, 3, 1, 2),
                                torch.from_numpy(b).permute(0, 3, 1, 2)).numpy()
    got = np.asarray(_distance(params, a, b, net))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * np.abs(expected).max())

    # The same weights as one pyiqa-layout file (trunk under net.slice<s>.<i>, lins.* duplicates, scaling
    # constants), and as a converted directory.
    slices = {"alex": (2, 5, 8, 10, 12), "vgg": (4, 9, 16, 23, 30)}[net]
    pyiqa_state = {"scaling_layer.shift": torch.zeros(1, 3, 1, 1), "scaling_layer.scale": torch.ones(1, 3, 1, 1)}
    for key, value in features.state_dict().items():
        index = int(key.split(".")[0])
        pyiqa_state[f"net.slice{1 + sum(index >= end for end in slices)}.{key}"] = value
    for i, lin in enumerate(lins):
        pyiqa_state[f"lin{i}.model.1.weight"] = pyiqa_state[f"lins.{i}.model.1.weight"] = lin.weight
    pyiqa_path = tmp_path / f"LPIPS_v0.1_{net}-00000000.pth"
    torch.save(pyiqa_state, pyiqa_path)
    convert(pyiqa_path, tmp_path / "converted", net=net)
    for _, other in (load_lpips(net, None, pyiqa_path), load_lpips_from(tmp_path / "converted", net)):
        jax.tree.map(np.testing.assert_array_equal, other, params)


def test_vgg_gradient_parity(tmp_path):
    """The training loss: d LPIPS-VGG / d input matches torch autograd in float64 (tight), and the fp32 jitted
    gradient stays within fp32's own error: torch's fp32 gradient is itself ~1.5e-3 * max off the float64
    one here (deep ReLU net, unit-normalised taps), so the fp32 bound is 5e-3 * max."""
    torch = import_torch()
    features, taps, lins, trunk_path, lin_path = _torch_setup(torch, "vgg", tmp_path)
    config, params = load_lpips("vgg", trunk_path, lin_path)
    a, b = _golden_inputs(json.loads(GOLDENS.read_text())["lpips"]["vgg"])
    a, b = a[1:2], b[1:2]
    features.double()
    for lin in lins:
        lin.double()
    a_torch = torch.from_numpy(a).permute(0, 3, 1, 2).double().requires_grad_(True)
    b_torch = torch.from_numpy(b).permute(0, 3, 1, 2).double()
    _torch_lpips(torch, features, taps, lins, a_torch, b_torch).sum().backward()
    expected = a_torch.grad.permute(0, 2, 3, 1).numpy()

    def loss(params, a, b):
        return jnp.sum(LPIPS(config).apply({"params": params}, a, b))

    grad = jax.jit(jax.grad(loss, argnums=1))
    with jax.enable_x64(True):
        params64 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), params)
        got64 = np.asarray(grad(params64, jnp.asarray(a, jnp.float64), jnp.asarray(b, jnp.float64)))
    np.testing.assert_allclose(got64, expected, rtol=0, atol=1e-6 * np.abs(expected).max())
    got32 = np.asarray(grad(params, a, b))
    np.testing.assert_allclose(got32, expected, rtol=0, atol=5e-3 * np.abs(expected).max())


def test_unit_normalize_gradient_is_finite_at_zero():
    features = jnp.zeros((1, 2, 2, 8)).at[0, 0, 0].set(1.0)
    grad = jax.grad(lambda f: jnp.sum(unit_normalize(f) * jnp.arange(8.0)))(features)
    assert np.isfinite(np.asarray(grad)).all()
    np.testing.assert_array_equal(unit_normalize(features)[0, 1, 1], 0.0)


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_matches_lpips_and_pyiqa_goldens(net):
    """Seeded random weights (no torch needed): the numbers the real lpips package and pyiqa produced
    (tools/make_metric_goldens.py), through the evaluation path (uint8 -> [0, 1] -> [-1, 1])."""
    golden = json.loads(GOLDENS.read_text())["lpips"][net]
    config = LPIPSConfig(net)
    params = params_from_state_dicts(config, random_state_dict(trunk_shapes(config), golden["seed"]),
                                     random_state_dict(lin_shapes(config), golden["seed"]))
    got = np.asarray(_distance(params, *_golden_inputs(golden), net))
    for source in ("lpips_package", "pyiqa"):
        expected = np.asarray(golden[source])
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * np.abs(expected).max(), err_msg=source)


def test_evaluation_metric_loads_published_file_names(tmp_path):
    torch = import_torch()
    features, taps, lins, trunk_path, lin_path = _torch_setup(torch, "alex", tmp_path)
    weights = tmp_path / "weights"
    weights.mkdir()
    trunk_path.rename(weights / "alexnet-owt-7be5be79.pth")
    lin_path.rename(weights / "alex.pth")
    sr, hr = random_image_pairs(5, 32, 48)
    with torch.no_grad():
        to_torch = lambda x: torch.from_numpy(x.astype(np.float32) / 255 * 2 - 1).permute(0, 3, 1, 2)
        expected = _torch_lpips(torch, features, taps, lins, to_torch(sr), to_torch(hr)).numpy()
    got = load_lpips_alex(weights)(sr, hr)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def test_strict_errors(tmp_path):
    torch = import_torch()
    _, _, _, trunk_path, lin_path = _torch_setup(torch, "alex", tmp_path)
    with pytest.raises(CheckpointError, match=r"alex_lin\.pth: holds only the lin heads.*alexnet-owt-7be5be79"):
        load_lpips("alex", None, lin_path)
    with pytest.raises(CheckpointError, match=r"(?s)alex_trunk\.pth: .*missing.*features\.2\.weight"):
        load_lpips("vgg", trunk_path, lin_path)

    state = {k: torch.from_numpy(v) for k, v in load_state_dict(lin_path).items()}
    state["lin2.model.1.weight"] = torch.zeros(1, 7, 1, 1)
    state["lin9.model.1.weight"] = torch.zeros(1, 3, 1, 1)
    del state["lin4.model.1.weight"]
    torch.save(state, tmp_path / "bad_lin.pth")
    with pytest.raises(CheckpointError) as error:
        load_lpips("alex", trunk_path, tmp_path / "bad_lin.pth")
    message = str(error.value)
    assert "bad_lin.pth" in message
    assert "lin4.model.1.weight" in message and "lin9.model.1.weight" in message
    assert "lin2.model.1.weight: expected (1, 384, 1, 1), found (1, 7, 1, 1)" in message

