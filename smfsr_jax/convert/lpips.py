"""LPIPS converter: torchvision trunk + lpips v0.1 lin heads (torch pickles) -> Flax params.

Accepted sources:
  - trunk: torchvision `alexnet-owt-7be5be79.pth` / `vgg16-397923af.pth` (`features.<i>.{weight,bias}`;
    the classifier is ignored);
  - lin heads: lpips `alex.pth` / `vgg.pth` (`lin<i>.model.1.weight`);
  - pyiqa `LPIPS_v0.1_{alex,vgg}-*.pth`: a state dict of pyiqa's whole LPIPS module, whose trunk keys are
    `net.slice<s>.<i>.{weight,bias}` (the torchvision index i is kept) beside the lin heads; its `lins.<i>`
    duplicates and `scaling_layer` constants are ignored. Without trunk keys it needs a trunk file.
  - a directory written by `convert`, or one holding the published file names (load_lpips_from).
Files are read with convert/torch_pickle (no torch).
"""

import dataclasses
import fnmatch
import os
import re

import jax
import jax.numpy as jnp
import numpy as np

from smfsr_jax.convert.converted_dir import is_converted, load_converted, save_converted
from smfsr_jax.convert.tensors import CheckpointError, check_keys, check_tree, conv_kernel, map_tensors, unflatten
from smfsr_jax.convert.torch_pickle import load_state_dict
from smfsr_jax.core import files
from smfsr_jax.models.lpips import LPIPS, LPIPSConfig

TRUNK_FILES = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth"}
LIN_FILES = {"alex": "alex.pth", "vgg": "vgg.pth"}
PYIQA_PATTERNS = {"alex": "LPIPS_v0.1_alex-*.pth", "vgg": "LPIPS_v0.1_vgg-*.pth"}
_PYIQA_TRUNK_KEY = re.compile(r"net\.slice\d+\.(\d+)\.(weight|bias)")
_LIN_IGNORED = (r"lins\.\d+\.model\.1\.weight", r"scaling_layer\.(shift|scale)")


def trunk_shapes(config: LPIPSConfig) -> dict:
    """{torchvision key: shape} of the trunk convs."""
    shapes = {}
    for conv in config.features:
        shapes[f"features.{conv.index}.weight"] = (conv.out_channels, conv.in_channels, conv.kernel, conv.kernel)
        shapes[f"features.{conv.index}.bias"] = (conv.out_channels,)
    return shapes


def lin_shapes(config: LPIPSConfig) -> dict:
    """{lpips key: shape} of the lin heads."""
    return {f"lin{i}.model.1.weight": (1, channels, 1, 1) for i, channels in enumerate(config.tap_channels)}


def _rules(config: LPIPSConfig) -> dict:
    rules = {}
    for conv in config.features:
        rules[f"features.{conv.index}.weight"] = (f"features_{conv.index}/kernel", conv_kernel)
        rules[f"features.{conv.index}.bias"] = (f"features_{conv.index}/bias", np.asarray)
    for i in range(len(config.tap_channels)):
        rules[f"lin{i}.model.1.weight"] = (f"lin{i}/kernel", conv_kernel)
    return rules


def abstract_params(config: LPIPSConfig):
    images = jnp.zeros((1, 64, 64, 3), jnp.float32)
    return jax.eval_shape(lambda: LPIPS(config).init(jax.random.key(0), images, images))["params"]


def params_from_state_dicts(config: LPIPSConfig, trunk: dict, lin: dict, trunk_source: str = "trunk",
                            lin_source: str = "lin") -> dict:
    """Flax params from torchvision-layout trunk and lpips-layout lin state dicts of numpy arrays."""
    check_keys(trunk_source, trunk, trunk_shapes(config), ignore=[r"classifier\..*"])
    check_keys(lin_source, lin, lin_shapes(config), ignore=_LIN_IGNORED)
    params = unflatten(map_tensors({**trunk, **lin}, _rules(config)))
    check_tree(lin_source, params, abstract_params(config))
    return params


def _load(net: str, trunk_path, lin_path, trunk_beside: bool) -> tuple[LPIPSConfig, dict]:
    """`trunk_beside`: trunk_path is merely a file found next to lin_path, used only when lin_path lacks
    the trunk (directory mode); otherwise passing a trunk beside a pyiqa file that has one is an error."""
    config = LPIPSConfig(net)
    if lin_path is None:
        raise CheckpointError(f"LPIPS-{net}: no lin weights given (lpips {LIN_FILES[net]} or pyiqa "
                              f"{PYIQA_PATTERNS[net]})")
    lin_path = os.fspath(lin_path)
    lin = load_state_dict(lin_path)
    embedded_trunk = {f"features.{m.group(1)}.{m.group(2)}": v
                      for k, v in lin.items() if (m := _PYIQA_TRUNK_KEY.fullmatch(k))}
    lin = {k: v for k, v in lin.items() if not _PYIQA_TRUNK_KEY.fullmatch(k)}

    if embedded_trunk and trunk_path is not None and not trunk_beside:
        raise CheckpointError(f"{lin_path}: holds the LPIPS trunk itself; do not also pass {trunk_path}")
    if embedded_trunk:
        trunk, trunk_source = embedded_trunk, lin_path
    elif trunk_path is not None:
        trunk_source = os.fspath(trunk_path)
        trunk = load_state_dict(trunk_source)
    else:
        raise CheckpointError(f"{lin_path}: holds only the lin heads; LPIPS-{net} also needs the torchvision "
                              f"trunk {TRUNK_FILES[net]}")
    return config, params_from_state_dicts(config, trunk, lin, trunk_source, lin_path)


def load_lpips(net: str, trunk_path=None, lin_path=None) -> tuple[LPIPSConfig, dict]:
    """(LPIPSConfig, Flax params as numpy fp32) from a torchvision trunk file and an lpips lin file, or from
    a pyiqa LPIPS file (as lin_path) that holds both. Strict: a CheckpointError names the file and every
    missing, unexpected or mis-shaped key."""
    return _load(net, trunk_path, lin_path, trunk_beside=False)


def _find_one(directory: str, pattern: str):
    matches = fnmatch.filter(files.listdir(directory), pattern)
    return os.path.join(directory, matches[0]) if matches else None


def load_lpips_from(path, net: str) -> tuple[LPIPSConfig, dict]:
    """LPIPS from one path: a directory written by `convert` (its config names the net), a directory
    holding the published files (torchvision trunk + lpips lin heads, or a pyiqa LPIPS file with or
    without trunk), or a single pyiqa LPIPS file that holds the trunk."""
    path = os.fspath(path)
    if is_converted(path):
        record, _, params = load_converted(path)
        config = LPIPSConfig(**record)
        if config.net != net:
            raise CheckpointError(f"{path}: converted LPIPS-{config.net}, but LPIPS-{net} was asked for")
        params = jax.tree.map(np.asarray, params)
        check_tree(path, params, abstract_params(config))
        return config, params
    if files.is_file(path):
        return _load(net, None, path, trunk_beside=False)
    if not files.is_dir(path):
        raise CheckpointError(f"{path}: no such file or directory")
    lin_file = _find_one(path, LIN_FILES[net]) or _find_one(path, PYIQA_PATTERNS[net])
    if lin_file is None:
        raise CheckpointError(f"{path}: no LPIPS-{net} lin weights ({LIN_FILES[net]} or {PYIQA_PATTERNS[net]})")
    return _load(net, _find_one(path, TRUNK_FILES[net]), lin_file, trunk_beside=True)


def convert(src: str, dst: str, net: str = "alex") -> LPIPSConfig:
    """Convert `src` (anything load_lpips_from reads) once and write an orbax checkpoint + JSON config to
    `dst`, read back by load_lpips_from."""
    config, params = load_lpips_from(src, net)
    meta = {"converter": "lpips", "source": files.absolute(src)}
    save_converted(dst, dataclasses.asdict(config), params, meta=meta)
    return config
