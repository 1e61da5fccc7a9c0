"""MANIQA converter: pyiqa `MANIQA_PIPAL-ae6d356b.pth` (a torch state dict with the ViT-B/8 inside) -> Flax.

Strict like pyiqa's load_state_dict(strict=True): every key of pyiqa's MANIQA must be present with its
shape. Tensors the score never uses are checked and dropped: ViT blocks after the last feature block, the
ViT's final norm and ImageNet head, each Swin stage's `downsample` conv, and the buffers that Swin derives
from the window size (`relative_position_index`, `attn_mask`), which we recompute.
"""

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from smfsr_jax.convert import torch_pickle
from smfsr_jax.convert.tensors import conv1x1_as_linear, conv_kernel, convert_checked, linear_kernel
from smfsr_jax.models.maniqa import MANIQA, PIPAL, MANIQAConfig


def _rules(config: MANIQAConfig) -> tuple[dict, dict]:
    """({torch key: (flax path, fn)} of the tensors we use, {torch key: shape} of every key)."""
    rules, shapes = {}, {}

    def add(key, path, fn, shape):
        if path is not None:
            rules[key] = (path, fn)
        shapes[key] = tuple(shape)

    def linear(key, path, cin, cout, fn=linear_kernel, kernel_shape=None):
        add(f"{key}.weight", path and f"{path}/kernel", fn, kernel_shape or (cout, cin))
        add(f"{key}.bias", path and f"{path}/bias", np.asarray, (cout,))

    def conv(key, path, cin, cout, k):
        linear(key, path, cin, cout, conv_kernel, (cout, cin, k, k))

    def norm(key, path, dim):
        add(f"{key}.weight", path and f"{path}/scale", np.asarray, (dim,))
        add(f"{key}.bias", path and f"{path}/bias", np.asarray, (dim,))

    dim, grid, used_blocks = config.embed_dim, config.grid, max(config.feature_blocks) + 1
    conv("vit.patch_embed.proj", "vit/patch_embed", 3, dim, config.patch_size)
    add("vit.cls_token", "vit/cls_token", lambda w: w.reshape(dim), (1, 1, dim))
    add("vit.pos_embed", "vit/pos_embed", lambda w: w[0], (1, grid ** 2 + 1, dim))
    for i in range(config.vit_depth):
        key, path = f"vit.blocks.{i}", (f"vit/blocks_{i}" if i < used_blocks else None)
        norm(f"{key}.norm1", path and f"{path}/norm1", dim)
        linear(f"{key}.attn.qkv", path and f"{path}/attn/qkv", dim, 3 * dim)
        linear(f"{key}.attn.proj", path and f"{path}/attn/proj", dim, dim)
        norm(f"{key}.norm2", path and f"{path}/norm2", dim)
        linear(f"{key}.mlp.fc1", path and f"{path}/mlp/fc1", dim, config.vit_mlp_dim)
        linear(f"{key}.mlp.fc2", path and f"{path}/mlp/fc2", config.vit_mlp_dim, dim)
    norm("vit.norm", None, dim)
    linear("vit.head", None, dim, config.vit_num_classes)

    window = min(config.window_size, grid)
    tokens = window ** 2
    windows = (grid // window) ** 2
    for stage, cin, width in ((1, 4 * dim, dim), (2, dim, dim // 2)):
        for i in range(config.num_tab):
            for proj in ("c_q", "c_k", "c_v"):
                linear(f"tablock{stage}.{i}.{proj}", f"tablock{stage}_{i}/{proj}", grid ** 2, grid ** 2)
        linear(f"conv{stage}", f"conv{stage}", cin, width, conv1x1_as_linear, (width, cin, 1, 1))
        swin = f"swintransformer{stage}"
        conv(f"{swin}.downsample", None, width, width, 3)
        for i, (depth, heads) in enumerate(zip(config.swin_depths, config.swin_heads)):
            layer, layer_path = f"{swin}.layers.{i}", f"{swin}/layers_{i}"
            conv(f"{layer}.conv", f"{layer_path}/conv", width, width, 3)
            for j in range(depth):
                key, path = f"{layer}.blocks.{j}", f"{layer_path}/blocks_{j}"
                norm(f"{key}.norm1", f"{path}/norm1", width)
                add(f"{key}.attn.relative_position_bias_table", f"{path}/attn/relative_position_bias_table",
                    np.asarray, ((2 * window - 1) ** 2, heads))
                add(f"{key}.attn.relative_position_index", None, None, (tokens, tokens))
                linear(f"{key}.attn.qkv", f"{path}/attn/qkv", width, 3 * width)
                linear(f"{key}.attn.proj", f"{path}/attn/proj", width, width)
                norm(f"{key}.norm2", f"{path}/norm2", width)
                linear(f"{key}.mlp.fc1", f"{path}/mlp/fc1", width, config.swin_mlp_dim)
                linear(f"{key}.mlp.fc2", f"{path}/mlp/fc2", config.swin_mlp_dim, width)
                if j % 2 and grid > config.window_size:  # shifted blocks register their mask as a buffer
                    add(f"{key}.attn_mask", None, None, (windows, tokens, tokens))
    half = dim // 2
    for head in ("fc_score", "fc_weight"):
        linear(f"{head}.0", f"{head}_0", half, half)
        linear(f"{head}.3", f"{head}_3", half, 1)
    return rules, shapes


def checkpoint_shapes(config: MANIQAConfig = PIPAL) -> dict:
    """{torch key: shape} of pyiqa's MANIQA state dict for `config` (all of it, used or not)."""
    return _rules(config)[1]


def abstract_params(config: MANIQAConfig):
    crops = jnp.zeros((config.num_crops, config.crop_size, config.crop_size, 3))
    return jax.eval_shape(lambda: MANIQA(config).init(jax.random.key(0), crops))["params"]


def convert_state_dict(tensors: Mapping, config: MANIQAConfig = PIPAL, source: str = "state dict") -> dict:
    """Strictly checked torch state dict {key: array} -> Flax params (numpy fp32) of the used tensors."""
    return convert_checked(source, tensors, *_rules(config), abstract_params(config))


def convert(src: str, dst: str, config: MANIQAConfig = PIPAL) -> MANIQAConfig:
    """pyiqa MANIQA .pth -> orbax params + JSON config in `dst` (read by evaluation.scoring.load_maniqa)."""
    return torch_pickle.convert_torch_file(src, dst, "maniqa", config, convert_state_dict)
