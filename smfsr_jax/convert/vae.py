"""SD3 VAE converter: diffusers or original (`first_stage_model.*`) safetensors -> Flax params.

Accepted sources:
  - a diffusers VAE directory (config.json + diffusion_pytorch_model.safetensors), or the SD3.5 root
    holding it as `vae/`;
  - a diffusers-layout .safetensors file;
  - the original single file (`sd3.5_medium.safetensors`): only `first_stage_model.*` keys are read;
  - a directory written by `convert`.
A single file carries no config: the shapes give the sizes, and norm_num_groups, scaling_factor and
shift_factor take the SD3 values unless passed as overrides.
"""

import dataclasses
import functools
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np

from smfsr_jax.convert.converted_dir import is_converted, load_converted, save_converted
from smfsr_jax.convert.tensors import (CheckpointError, check_keys, check_tree, conv1x1_as_linear, conv_kernel,
                                       linear_kernel, map_tensors, open_weights, tensor_shape, unflatten)
from smfsr_jax.core import files
from smfsr_jax.models.vae import AutoencoderKL, VAEConfig

ORIGINAL_PREFIX = "first_stage_model."
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
LAYOUTS = ("diffusers", "original")
DIFFUSERS_DEFAULTS = dict(in_channels=3, out_channels=3, block_out_channels=(64,), layers_per_block=1,
                          latent_channels=4, norm_num_groups=32, scaling_factor=0.18215, shift_factor=None)


class _Rules:
    """Collects {source key: (flax path, fn)} and {source key: torch shape} for one layout."""

    def __init__(self, layout: str):
        self.layout = layout
        self.rules, self.shapes = {}, {}

    def _add(self, key, path, fn, shape):
        self.rules[key] = (path, fn)
        self.shapes[key] = tuple(shape)

    def _name(self, diffusers, original):
        return diffusers if self.layout == "diffusers" else original

    def conv(self, diffusers, original, path, cin, cout, k=3):
        key = self._name(diffusers, original)
        self._add(f"{key}.weight", f"{path}/kernel", conv_kernel, (cout, cin, k, k))
        self._add(f"{key}.bias", f"{path}/bias", np.asarray, (cout,))

    def norm(self, diffusers, original, path, channels):
        key = self._name(diffusers, original)
        self._add(f"{key}.weight", f"{path}/scale", np.asarray, (channels,))
        self._add(f"{key}.bias", f"{path}/bias", np.asarray, (channels,))

    def linear(self, diffusers, original, path, channels):
        # The original attention projections are 1x1 convs.
        if self.layout == "diffusers":
            self._add(f"{diffusers}.weight", f"{path}/kernel", linear_kernel, (channels, channels))
        else:
            self._add(f"{original}.weight", f"{path}/kernel", conv1x1_as_linear, (channels, channels, 1, 1))
        self._add(f"{self._name(diffusers, original)}.bias", f"{path}/bias", np.asarray, (channels,))

    def resnet(self, diffusers, original, path, cin, cout):
        self.norm(f"{diffusers}.norm1", f"{original}.norm1", f"{path}/norm1", cin)
        self.conv(f"{diffusers}.conv1", f"{original}.conv1", f"{path}/conv1", cin, cout)
        self.norm(f"{diffusers}.norm2", f"{original}.norm2", f"{path}/norm2", cout)
        self.conv(f"{diffusers}.conv2", f"{original}.conv2", f"{path}/conv2", cout, cout)
        if cin != cout:
            self.conv(f"{diffusers}.conv_shortcut", f"{original}.nin_shortcut", f"{path}/conv_shortcut", cin, cout,
                      k=1)

    def mid_block(self, part, channels):
        d, o, p = f"{part}.mid_block", f"{part}.mid", f"{part}/mid_block"
        self.resnet(f"{d}.resnets.0", f"{o}.block_1", f"{p}/resnets_0", channels, channels)
        attn_d, attn_o, attn_p = f"{d}.attentions.0", f"{o}.attn_1", f"{p}/attentions_0"
        self.norm(f"{attn_d}.group_norm", f"{attn_o}.norm", f"{attn_p}/group_norm", channels)
        for diffusers, original in (("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
            self.linear(f"{attn_d}.{diffusers}", f"{attn_o}.{original}", f"{attn_p}/{diffusers.split('.')[0]}",
                        channels)
        self.resnet(f"{d}.resnets.1", f"{o}.block_2", f"{p}/resnets_1", channels, channels)

    def level_block(self, part, direction, index, level, cin, cout, layers, resample):
        """A `direction` ("down" or "up") block of `part`: `layers` resnets, then a resampling conv if
        `resample`. diffusers numbers the blocks by order of use (`index`), the original by resolution `level`."""
        d, o = f"{part}.{direction}_blocks.{index}", f"{part}.{direction}.{level}"
        p = f"{part}/{direction}_blocks_{index}"
        for j in range(layers):
            self.resnet(f"{d}.resnets.{j}", f"{o}.block.{j}", f"{p}/resnets_{j}", cin, cout)
            cin = cout
        if resample:
            self.conv(f"{d}.{direction}samplers.0.conv", f"{o}.{direction}sample.conv",
                      f"{p}/{direction}samplers_0/conv", cout, cout)


def _build_rules(config: VAEConfig, layout: str) -> _Rules:
    """Every VAE tensor of `layout` (unprefixed keys) with its Flax path, mapping function and shape."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    r = _Rules(layout)
    channels, levels = config.block_out_channels, len(config.block_out_channels)

    r.conv("encoder.conv_in", "encoder.conv_in", "encoder/conv_in", config.in_channels, channels[0])
    cin = channels[0]
    for level, cout in enumerate(channels):
        r.level_block("encoder", "down", level, level, cin, cout, config.layers_per_block, level < levels - 1)
        cin = cout
    r.mid_block("encoder", channels[-1])
    r.norm("encoder.conv_norm_out", "encoder.norm_out", "encoder/conv_norm_out", channels[-1])
    r.conv("encoder.conv_out", "encoder.conv_out", "encoder/conv_out", channels[-1], 2 * config.latent_channels)

    r.conv("decoder.conv_in", "decoder.conv_in", "decoder/conv_in", config.latent_channels, channels[-1])
    r.mid_block("decoder", channels[-1])
    cin = channels[-1]
    for i, cout in enumerate(reversed(channels)):
        r.level_block("decoder", "up", i, levels - 1 - i, cin, cout, config.layers_per_block + 1, i < levels - 1)
        cin = cout
    r.norm("decoder.conv_norm_out", "decoder.norm_out", "decoder/conv_norm_out", channels[0])
    r.conv("decoder.conv_out", "decoder.conv_out", "decoder/conv_out", channels[0], config.out_channels)
    return r


def checkpoint_shapes(config: VAEConfig, layout: str = "diffusers") -> dict:
    """{torch key: shape} of the VAE in `layout` (original keys without the `first_stage_model.` prefix)."""
    return dict(_build_rules(config, layout).shapes)


@functools.lru_cache(maxsize=None)
def abstract_params(config: VAEConfig):
    """The Flax parameter tree as ShapeDtypeStructs (no memory)."""
    images = jnp.zeros((1, 2 * config.downscale, 2 * config.downscale, config.in_channels), jnp.float32)
    return jax.eval_shape(lambda: AutoencoderKL(config).init(jax.random.key(0), images))["params"]


def _detect_layout(source: str, tensors) -> tuple[str, str]:
    """(layout, key prefix) of a safetensors state dict."""
    keys = set(tensors)
    if any(k.startswith(ORIGINAL_PREFIX) for k in keys):
        return "original", ORIGINAL_PREFIX
    if "encoder.mid.block_1.conv1.weight" in keys:
        return "original", ""
    if any(k.startswith("encoder.down_blocks.") for k in keys):
        return "diffusers", ""
    raise CheckpointError(f"{source}: no VAE tensors found: expected diffusers keys (encoder.down_blocks.*) "
                          f"or original keys ({ORIGINAL_PREFIX}encoder.down.*)")


def _infer_config(source: str, tensors, layout: str, prefix: str) -> dict:
    """VAEConfig fields readable from tensor shapes (levels, widths, layers, latent and image channels)."""
    if layout == "diffusers":
        level_key = r"encoder\.down_blocks\.(\d+)\.resnets\.0\.conv1\.weight"
        layer_key = r"encoder\.down_blocks\.0\.resnets\.(\d+)\.conv1\.weight"
        block_key = "encoder.down_blocks.{}.resnets.0.conv1.weight"
    else:
        level_key = r"encoder\.down\.(\d+)\.block\.0\.conv1\.weight"
        layer_key = r"encoder\.down\.0\.block\.(\d+)\.conv1\.weight"
        block_key = "encoder.down.{}.block.0.conv1.weight"
    names = [k[len(prefix):] for k in tensors if k.startswith(prefix)]

    def count(pattern):
        found = [int(m.group(1)) for m in map(re.compile(pattern).fullmatch, names) if m]
        return max(found) + 1 if found else 0

    def shape(key):
        if prefix + key not in tensors:
            raise CheckpointError(f"{source}: cannot infer the VAE config: tensor {prefix + key!r} is missing")
        return tensor_shape(tensors, prefix + key)

    levels = count(level_key)
    if not levels:
        raise CheckpointError(f"{source}: cannot infer the VAE config: no tensor matches {prefix}{level_key}")
    return dict(
        in_channels=shape("encoder.conv_in.weight")[1],
        out_channels=shape("decoder.conv_out.weight")[0],
        block_out_channels=tuple(shape(block_key.format(level))[0] for level in range(levels)),
        layers_per_block=count(layer_key),
        latent_channels=shape("decoder.conv_in.weight")[1],
        downscale=2 ** (levels - 1),
    )


def _diffusers_config(path: str) -> dict:
    """VAEConfig fields from a diffusers AutoencoderKL config.json; rejects what our network does not have."""
    record = json.loads(files.read_text(path))
    problems = []
    if record.get("act_fn", "silu") != "silu":
        problems.append(f"act_fn={record['act_fn']!r} (only silu)")
    if record.get("use_quant_conv", True) or record.get("use_post_quant_conv", True):
        problems.append("quant_conv / post_quant_conv (the SD3 VAE has none: set use_quant_conv and "
                        "use_post_quant_conv to false)")
    if not record.get("mid_block_add_attention", True):
        problems.append("mid_block_add_attention=false")
    for field, block in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        if any(t != block for t in record.get(field, [block])):
            problems.append(f"{field}={record[field]} (only {block})")
    if problems:
        raise CheckpointError(f"{path}: unsupported AutoencoderKL config: " + "; ".join(problems))
    # Absent fields take diffusers' AutoencoderKL defaults, as diffusers itself would read the file.
    fields = {**DIFFUSERS_DEFAULTS, **{k: record[k] for k in DIFFUSERS_DEFAULTS if k in record}}
    fields["block_out_channels"] = tuple(fields["block_out_channels"])
    fields["downscale"] = 2 ** (len(fields["block_out_channels"]) - 1)
    fields["shift_factor"] = fields["shift_factor"] or 0.0  # null in SD1/SDXL VAE configs
    return fields


def _resolve_directory(path: str) -> str:
    """A diffusers VAE directory: `path` itself, or its `vae/` subfolder (the SD3.5 root)."""
    if files.is_dir(os.path.join(path, "vae")) and not files.exists(os.path.join(path, "config.json")):
        return os.path.join(path, "vae")
    return path


def _make_config(source: str, fields: dict, overrides: dict) -> VAEConfig:
    try:
        return VAEConfig.from_dict({**fields, **overrides})
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: invalid VAE config {fields} with overrides {overrides}: {e}") from None


def _load(path: str, show_progress: bool, overrides: dict) -> tuple[VAEConfig, dict, str]:
    path = os.fspath(path)
    is_dir = files.is_dir(path)
    if is_dir and is_converted(path):
        record, _, params = load_converted(path)
        config = _make_config(path, record, overrides)
        params = jax.tree.map(np.asarray, params)
        check_tree(path, params, abstract_params(config))
        return config, params, "converted"

    fields = {}
    if is_dir:
        path = _resolve_directory(path)
        if files.exists(os.path.join(path, "config.json")):
            fields = _diffusers_config(os.path.join(path, "config.json"))
        weights = os.path.join(path, DIFFUSERS_WEIGHTS)
        tensors = open_weights(weights if files.exists(weights) else path)
    else:
        tensors = open_weights(path)
    source = tensors.path
    layout, prefix = _detect_layout(source, tensors)
    config = _make_config(source, fields or _infer_config(source, tensors, layout, prefix), overrides)

    rules = _build_rules(config, layout)
    expected = {prefix + k: shape for k, shape in rules.shapes.items()}
    # The original single file also holds the MM-DiT and text encoders: everything outside the prefix.
    ignore = [rf"(?!{re.escape(prefix)}).*"] if prefix else []
    check_keys(source, tensors, expected, ignore=ignore)
    flat = map_tensors(tensors, {prefix + k: rule for k, rule in rules.rules.items()},
                       show_progress=show_progress, desc="vae")
    params = unflatten(flat)
    check_tree(source, params, abstract_params(config))
    return config, params, layout


def load_vae(path: str, show_progress: bool = False, **config_overrides) -> tuple[VAEConfig, dict]:
    """(VAEConfig, Flax params as numpy fp32) from any accepted source (module docstring).

    `config_overrides` replace VAEConfig fields (e.g. dtype, remat, or norm_num_groups for a single file,
    whose tensors do not record it); shape-changing overrides fail the strict key check.
    """
    config, params, _ = _load(path, show_progress, config_overrides)
    return config, params


def convert(src: str, dst: str, show_progress: bool = True, **config_overrides) -> VAEConfig:
    """Convert `src` once and write an orbax checkpoint + JSON config to `dst` (read back by load_vae)."""
    config, params, layout = _load(src, show_progress, config_overrides)
    meta = {"converter": "vae", "source": files.absolute(src), "layout": layout}
    save_converted(dst, dataclasses.asdict(config), params, meta=meta)
    return config
