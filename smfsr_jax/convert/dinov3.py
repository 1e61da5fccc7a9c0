"""DINOv3 ViT checkpoints -> Flax params for smfsr_jax.models.dinov3 (numpy only; torch is never imported).

`load_dinov3(path)` accepts:
  * a Hugging Face `DINOv3ViTModel` directory (config.json + *.safetensors), or one .safetensors file with
    its config.json beside it. Keys `layer.N.*` (Hub files) or `model.layer.N.*` (transformers 5 modules);
  * the original facebookresearch/dinov3 state dict, as the released .pth or saved as .safetensors
    (`storage_tokens`, fused `blocks.N.attn.qkv.*` with its `bias_mask`, `ls1.gamma`, `mlp.fc1`/`mlp.w1`).
    The architecture is read from the tensor shapes; keys are mapped as transformers'
    `convert_dinov3_vit_to_hf.py` does: qkv split in thirds, the masked key bias dropped, `mask_token`
    (1, D) -> (1, 1, D), `rope_embed.periods` checked and dropped (RoPE is recomputed), `local_cls_norm` dropped;
  * a directory written by `convert`.
"""

import dataclasses
import json
import os
import re

import numpy as np

from smfsr_jax.convert.converted_dir import CONFIG_NAME, is_converted, load_converted, save_converted
from smfsr_jax.convert.tensors import (CheckpointError, check_keys, check_tree, conv_kernel, linear_kernel, map_tensors,
                                       open_weights, tensor_shape, unflatten)
from smfsr_jax.convert.torch_pickle import load_state_dict
from smfsr_jax.core import files
from smfsr_jax.models.dinov3 import DINOv3Config, abstract_params

HF_MODEL_TYPE = "dinov3_vit"


def hf_key_map(config: DINOv3Config, layer_prefix: str = "layer") -> dict:
    """{HF key: (torch shape, Flax path, per-tensor fn)} for every tensor of a DINOv3ViTModel."""
    c = config
    d, i = c.hidden_size, c.intermediate_size
    rules = {
        "embeddings.cls_token": ((1, 1, d), "embeddings/cls_token", np.asarray),
        "embeddings.mask_token": ((1, 1, d), "embeddings/mask_token", np.asarray),
        "embeddings.register_tokens": ((1, c.num_register_tokens, d), "embeddings/register_tokens", np.asarray),
        "embeddings.patch_embeddings.weight": ((d, c.num_channels, c.patch_size, c.patch_size),
                                               "embeddings/patch_embeddings/kernel", conv_kernel),
        "embeddings.patch_embeddings.bias": ((d,), "embeddings/patch_embeddings/bias", np.asarray),
        "norm.weight": ((d,), "norm/scale", np.asarray),
        "norm.bias": ((d,), "norm/bias", np.asarray),
    }
    linears = [("attention.q_proj", d, d, c.query_bias), ("attention.k_proj", d, d, c.key_bias),
               ("attention.v_proj", d, d, c.value_bias), ("attention.o_proj", d, d, c.proj_bias),
               ("mlp.up_proj", d, i, c.mlp_bias), ("mlp.down_proj", i, d, c.mlp_bias)]
    if c.use_gated_mlp:
        linears.append(("mlp.gate_proj", d, i, c.mlp_bias))
    for n in range(c.num_hidden_layers):
        src, dst = f"{layer_prefix}.{n}", f"layer_{n}"
        for norm in ("norm1", "norm2"):
            rules[f"{src}.{norm}.weight"] = ((d,), f"{dst}/{norm}/scale", np.asarray)
            rules[f"{src}.{norm}.bias"] = ((d,), f"{dst}/{norm}/bias", np.asarray)
        for scale in ("layer_scale1", "layer_scale2"):
            rules[f"{src}.{scale}.lambda1"] = ((d,), f"{dst}/{scale}/lambda1", np.asarray)
        for name, fan_in, fan_out, bias in linears:
            path = f"{dst}/{name.replace('.', '/')}"
            rules[f"{src}.{name}.weight"] = ((fan_out, fan_in), f"{path}/kernel", linear_kernel)
            if bias:
                rules[f"{src}.{name}.bias"] = ((fan_out,), f"{path}/bias", np.asarray)
    return rules


def _make_config(source: str, **kwargs) -> DINOv3Config:
    try:
        return DINOv3Config(**kwargs)
    except ValueError as e:
        raise CheckpointError(f"{source}: unsupported configuration: {e}") from None


def config_from_hf(hf_config: dict, source: str) -> DINOv3Config:
    """DINOv3Config from a transformers DINOv3ViTConfig dict (absent fields take transformers' defaults)."""
    if hf_config.get("model_type") != HF_MODEL_TYPE:
        raise CheckpointError(f"{source}: model_type is {hf_config.get('model_type')!r}, expected {HF_MODEL_TYPE!r}")
    fields = {f.name for f in dataclasses.fields(DINOv3Config)}
    kwargs = {k: v for k, v in hf_config.items() if k in fields}
    patch = kwargs.get("patch_size", DINOv3Config.patch_size)
    if isinstance(patch, (list, tuple)):
        if len(set(patch)) != 1:
            raise CheckpointError(f"{source}: non-square patch_size {patch} is not supported")
        kwargs["patch_size"] = patch[0]
    return _make_config(source, **kwargs)


def _hf_config_path(path: str) -> str:
    return os.path.join(path if files.is_dir(path) else os.path.dirname(files.absolute(path)), CONFIG_NAME)


def _read_hf_config(path: str, source: str) -> DINOv3Config:
    config_path = _hf_config_path(path)
    if not files.exists(config_path):
        raise CheckpointError(f"{source}: Hugging Face DINOv3 weights need their config.json beside them "
                              f"({config_path} is absent)")
    return config_from_hf(json.loads(files.read_text(config_path)), config_path)


# Original facebookresearch/dinov3 layout.
_BLOCK = re.compile(r"blocks\.(\d+)\.")


def _require_shape(tensors, key: str, source: str) -> tuple:
    if key not in tensors:
        raise CheckpointError(f"{source}: not a DINOv3 ViT checkpoint in the original layout: {key!r} is missing")
    return tensor_shape(tensors, key)


def config_from_original(tensors, source: str) -> DINOv3Config:
    """Architecture of an original-layout state dict, read from its tensor shapes."""
    hidden_size = _require_shape(tensors, "cls_token", source)[-1]
    _, channels, patch, _ = _require_shape(tensors, "patch_embed.proj.weight", source)
    gated = "blocks.0.mlp.w1.weight" in tensors
    intermediate = _require_shape(tensors, "blocks.0.mlp.w1.weight" if gated else "blocks.0.mlp.fc1.weight",
                                  source)[0]
    depth = 1 + max((int(m.group(1)) for m in map(_BLOCK.match, tensors) if m), default=-1)
    # periods holds head_dim/4 entries; DINOv3 heads are 64 wide when the buffer is absent.
    head_dim = 4 * tensor_shape(tensors, "rope_embed.periods")[0] if "rope_embed.periods" in tensors else 64
    if hidden_size % head_dim:
        raise CheckpointError(f"{source}: width {hidden_size} is not a multiple of the head dim {head_dim}")
    qkv_bias = "blocks.0.attn.qkv.bias" in tensors
    return _make_config(
        source, hidden_size=hidden_size, intermediate_size=intermediate, num_hidden_layers=depth,
        num_attention_heads=hidden_size // head_dim, patch_size=patch, num_channels=channels,
        num_register_tokens=tensor_shape(tensors, "storage_tokens")[1] if "storage_tokens" in tensors else 0,
        hidden_act="silu" if gated else "gelu", use_gated_mlp=gated,
        query_bias=qkv_bias, value_bias=qkv_bias,
        # LinearKMaskedBias zeroes the key third of the bias through `bias_mask`; without the mask it is used.
        key_bias=qkv_bias and "blocks.0.attn.qkv.bias_mask" not in tensors,
        proj_bias="blocks.0.attn.proj.bias" in tensors,
        mlp_bias=f"blocks.0.mlp.{'w3' if gated else 'fc2'}.bias" in tensors)


def original_shapes(config: DINOv3Config, has_periods: bool) -> dict:
    """{original key: shape} expected for `config`."""
    c = config
    d, i = c.hidden_size, c.intermediate_size
    shapes = {"cls_token": (1, 1, d), "mask_token": (1, d),
              "patch_embed.proj.weight": (d, c.num_channels, c.patch_size, c.patch_size),
              "patch_embed.proj.bias": (d,), "norm.weight": (d,), "norm.bias": (d,)}
    if c.num_register_tokens:
        shapes["storage_tokens"] = (1, c.num_register_tokens, d)
    if has_periods:
        shapes["rope_embed.periods"] = (c.head_dim // 4,)
    mlp = ([("w1", d, i), ("w2", d, i), ("w3", i, d)] if c.use_gated_mlp else [("fc1", d, i), ("fc2", i, d)])
    for n in range(c.num_hidden_layers):
        b = f"blocks.{n}"
        for name in ("norm1", "norm2"):
            shapes[f"{b}.{name}.weight"] = shapes[f"{b}.{name}.bias"] = (d,)
        shapes[f"{b}.ls1.gamma"] = shapes[f"{b}.ls2.gamma"] = (d,)
        shapes[f"{b}.attn.qkv.weight"] = (3 * d, d)
        if c.query_bias:
            shapes[f"{b}.attn.qkv.bias"] = (3 * d,)
            if not c.key_bias:
                shapes[f"{b}.attn.qkv.bias_mask"] = (3 * d,)
        shapes[f"{b}.attn.proj.weight"] = (d, d)
        if c.proj_bias:
            shapes[f"{b}.attn.proj.bias"] = (d,)
        for name, fan_in, fan_out in mlp:
            shapes[f"{b}.mlp.{name}.weight"] = (fan_out, fan_in)
            if c.mlp_bias:
                shapes[f"{b}.mlp.{name}.bias"] = (fan_out,)
    return shapes


def _check_original_buffers(tensors, config: DINOv3Config, source: str):
    """The buffers we drop must describe what our network computes."""
    d, problems = config.hidden_size, []
    if "rope_embed.periods" in tensors:
        # Base-parametrised RoPE; rtol admits periods stored in bf16.
        expected = config.rope_theta ** (4 * np.arange(config.head_dim // 4) / config.head_dim)
        if not np.allclose(np.asarray(tensors["rope_embed.periods"], np.float64), expected, rtol=1e-2):
            problems.append(f"rope_embed.periods are not the base-{config.rope_theta:g} RoPE periods "
                            f"(min/max-period RoPE is not supported)")
    key_mask = np.concatenate([np.ones(d), np.zeros(d), np.ones(d)])
    for n in range(config.num_hidden_layers):
        key = f"blocks.{n}.attn.qkv.bias_mask"
        if key in tensors and not np.array_equal(np.asarray(tensors[key], np.float64), key_mask):
            problems.append(f"{key} is not (1, 0, 1) over (q, k, v): only the key bias may be masked")
    if problems:
        raise CheckpointError("\n  ".join([f"{source}: checkpoint does not match the network"] + problems))


def original_to_hf(tensors, config: DINOv3Config) -> dict:
    """Original-layout arrays under Hugging Face names (as transformers' conversion script maps them)."""
    c = config
    d = c.hidden_size
    hf = {"embeddings.cls_token": tensors["cls_token"],
          "embeddings.mask_token": np.asarray(tensors["mask_token"]).reshape(1, 1, d),
          "embeddings.register_tokens": (tensors["storage_tokens"] if c.num_register_tokens
                                         else np.zeros((1, 0, d), np.float32)),
          "embeddings.patch_embeddings.weight": tensors["patch_embed.proj.weight"],
          "embeddings.patch_embeddings.bias": tensors["patch_embed.proj.bias"],
          "norm.weight": tensors["norm.weight"], "norm.bias": tensors["norm.bias"]}
    mlp = {"w1": "gate_proj", "w2": "up_proj", "w3": "down_proj", "fc1": "up_proj", "fc2": "down_proj"}
    for n in range(c.num_hidden_layers):
        b, h = f"blocks.{n}", f"layer.{n}"
        for name in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias"):
            hf[f"{h}.{name}"] = tensors[f"{b}.{name}"]
        hf[f"{h}.layer_scale1.lambda1"] = tensors[f"{b}.ls1.gamma"]
        hf[f"{h}.layer_scale2.lambda1"] = tensors[f"{b}.ls2.gamma"]
        q, k, v = np.split(np.asarray(tensors[f"{b}.attn.qkv.weight"]), 3, axis=0)
        hf[f"{h}.attention.q_proj.weight"], hf[f"{h}.attention.k_proj.weight"] = q, k
        hf[f"{h}.attention.v_proj.weight"] = v
        if c.query_bias:
            q, k, v = np.split(np.asarray(tensors[f"{b}.attn.qkv.bias"]), 3)
            hf[f"{h}.attention.q_proj.bias"], hf[f"{h}.attention.v_proj.bias"] = q, v
            if c.key_bias:
                hf[f"{h}.attention.k_proj.bias"] = k
        hf[f"{h}.attention.o_proj.weight"] = tensors[f"{b}.attn.proj.weight"]
        if c.proj_bias:
            hf[f"{h}.attention.o_proj.bias"] = tensors[f"{b}.attn.proj.bias"]
        for src, dst in mlp.items():
            for kind in ("weight", "bias"):
                if f"{b}.mlp.{src}.{kind}" in tensors:
                    hf[f"{h}.mlp.{dst}.{kind}"] = tensors[f"{b}.mlp.{src}.{kind}"]
    return hf


def _open(path: str):
    """(tensors, source name) of a .safetensors file or directory, or of a torch pickle (.pth)."""
    if files.is_file(path) and not path.endswith(".safetensors"):
        return load_state_dict(path), path
    tensors = open_weights(path)
    return tensors, tensors.path


def load_dinov3(path: str, show_progress: bool = False):
    """(DINOv3Config, params) from a Hugging Face or original checkpoint, or a `convert` output directory."""
    path = str(path)
    if is_converted(path):
        config_dict, _, params = load_converted(path)
        config = DINOv3Config(**config_dict)
        check_tree(path, params, abstract_params(config))
        return config, params
    tensors, source = _open(path)
    if "cls_token" in tensors:
        config = config_from_original(tensors, source)
        check_keys(source, tensors, original_shapes(config, "rope_embed.periods" in tensors),
                   ignore=[r"local_cls_norm\..*"])
        _check_original_buffers(tensors, config, source)
        tensors, layer_prefix = original_to_hf(tensors, config), "layer"
    elif "embeddings.cls_token" in tensors:
        config = _read_hf_config(path, source)
        layer_prefix = "model.layer" if any(k.startswith("model.layer.") for k in tensors) else "layer"
    else:
        raise CheckpointError(f"{source}: not a DINOv3 ViT checkpoint: neither `embeddings.cls_token` "
                              f"(Hugging Face) nor `cls_token` (original layout) is present")
    rules = hf_key_map(config, layer_prefix)
    check_keys(source, tensors, {k: shape for k, (shape, _, _) in rules.items()})
    flat = map_tensors(tensors, {k: (p, fn) for k, (_, p, fn) in rules.items()},
                       show_progress=show_progress, desc="DINOv3")
    params = unflatten(flat)
    check_tree(source, params, abstract_params(config))
    return config, params


def convert(src: str, dst: str, show_progress: bool = True) -> DINOv3Config:
    """Convert once to an orbax checkpoint (dst/params + dst/config.json) that load_dinov3 reads back."""
    config, params = load_dinov3(src, show_progress=show_progress)
    save_converted(dst, dataclasses.asdict(config), params, meta={"source": files.absolute(src)})
    return config
