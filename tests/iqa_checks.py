"""Tolerances and checks shared by the MUSIQ, MANIQA and CLIPIQA parity tests."""

import dataclasses

import jax
import numpy as np
import pytest

from smfsr_jax.convert.converted_dir import load_converted, save_converted
from smfsr_jax.convert.tensors import CheckpointError
from tests.conftest import import_torch

# A score is one scalar at the end of a deep fp32 chain, where summation order alone moves it by up to
# ~6e-6 relative (full-size MUSIQ); activations are compared against their largest entry.
SCORE_REL = 5e-5


def assert_close(actual, expected, rel=1e-5):
    expected = np.asarray(expected)
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=0, atol=rel * np.abs(expected).max())


def unit(image):
    """A uint8 HWC image as a (1, H, W, C) float batch in [0, 1]."""
    return image[None].astype(np.float32) / 255


def assert_keys_match(checkpoint_shapes, presets, golden):
    """The converter's expected {key: shape} for each (preset, config) is the reference network's key table."""
    for preset, config in presets:
        keys = [f"{k}:{shape}" for k, shape in checkpoint_shapes(config).items()]
        assert sorted(keys) == sorted(golden[f"{preset}/keys"]), preset


def saved_scorer(directory, name: str, config, params, load):
    """`load(directory)` after saving `params` there like the converter `name` does."""
    save_converted(directory, dataclasses.asdict(config), params, meta={"converter": name})
    return load(directory)


def assert_conversion_fails(convert_state_dict, tensors, config, source: str, expected):
    """One CheckpointError that names `source` first and then every string of `expected`."""
    with pytest.raises(CheckpointError) as error:
        convert_state_dict(tensors, config, source=source)
    message = str(error.value)
    assert message.startswith(f"{source}:")
    for part in expected:
        assert part in message


def assert_converts_file(converter, name: str, config, config_from_dict, src, tensors, dst):
    """`converter.convert(src, dst, config)` writes `config`, its name and the params of `tensors`."""
    converter.convert(src, dst, config)
    config_dict, meta, params = load_converted(dst)
    assert config_from_dict(config_dict) == config and meta["converter"] == name
    jax.tree.map(np.testing.assert_array_equal, params, converter.convert_state_dict(tensors, config))


def save_pth(tensors, path):
    """A torch .pth state dict of numpy `tensors`, as pyiqa's checkpoints (skips without torch)."""
    torch = import_torch()
    torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, path)
