"""MUSIQ converter: pyiqa `musiq_koniq_ckpt-e95806b9.pth` (a torch state dict) -> Flax params.

The state dict is read without torch (convert/torch_pickle.py) and checked strictly against the keys of
pyiqa's MUSIQ(num_class=1), which loads it with strict=True. The official TF `koniq_ckpt.npz` is not
supported (its key layout could not be checked against the file here).
"""

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from smfsr_jax.convert import torch_pickle
from smfsr_jax.convert.tensors import conv_kernel, convert_checked, linear_kernel
from smfsr_jax.models.musiq import KONIQ, MUSIQ, STEM_WIDTH, MUSIQConfig


def _rules(config: MUSIQConfig) -> tuple[dict, dict]:
    """({torch key: (flax path, fn)}, {torch key: torch shape}) of pyiqa's MUSIQ state dict."""
    rules, shapes = {}, {}

    def add(key, path, fn, shape):
        rules[key] = (path, fn)
        shapes[key] = tuple(shape)

    def std_conv(key, path, cin, cout, k):
        add(f"{key}.weight", f"{path}/kernel", conv_kernel, (cout, cin, k, k))

    def norm(key, path, channels):
        add(f"{key}.weight", f"{path}/scale", np.asarray, (channels,))
        add(f"{key}.bias", f"{path}/bias", np.asarray, (channels,))

    def linear(key, path, cin, cout):
        add(f"{key}.weight", f"{path}/kernel", linear_kernel, (cout, cin))
        add(f"{key}.bias", f"{path}/bias", np.asarray, (cout,))

    width, dim = STEM_WIDTH, config.hidden_size
    std_conv("conv_root", "conv_root", 3, width, 7)
    norm("gn_root", "gn_root", width)
    for conv, gn, cout, k in (("conv1", "gn1", width, 1), ("conv2", "gn2", width, 3), ("conv3", "gn3", 4 * width, 1),
                              ("conv_proj", "gn_proj", 4 * width, 1)):
        std_conv(f"block1.{conv}", f"block1/{conv}", width, cout, k)
        norm(f"block1.{gn}", f"block1/{gn}", cout)
    linear("embedding", "embedding", 4 * width * (config.patch_size // 4) ** 2, dim)

    enc = "transformer_encoder"
    add(f"{enc}.posembed_input.position_emb", f"{enc}/position_emb", lambda w: w[0],
        (1, config.hash_grid_size ** 2, dim))
    add(f"{enc}.scaleembed_input.scale_emb", f"{enc}/scale_emb", np.asarray, (config.num_scales, dim))
    add(f"{enc}.cls", f"{enc}/cls", lambda w: w.reshape(dim), (1, 1, dim))
    norm(f"{enc}.encoder_norm", f"{enc}/encoder_norm", dim)
    for i in range(config.num_layers):
        key, path = f"{enc}.transformer.encoderblock_{i}", f"{enc}/encoderblock_{i}"
        norm(f"{key}.norm1", f"{path}/norm1", dim)
        for proj in ("query", "key", "value", "out"):
            linear(f"{key}.attention.{proj}", f"{path}/attention/{proj}", dim, dim)
        norm(f"{key}.norm2", f"{path}/norm2", dim)
        linear(f"{key}.mlp.fc1", f"{path}/mlp/fc1", dim, config.mlp_dim)
        linear(f"{key}.mlp.fc2", f"{path}/mlp/fc2", config.mlp_dim, dim)
    linear("head", "head", dim, 1)
    return rules, shapes


def checkpoint_shapes(config: MUSIQConfig = KONIQ) -> dict:
    """{torch key: shape} of pyiqa's MUSIQ state dict for `config`."""
    return _rules(config)[1]


def abstract_params(config: MUSIQConfig):
    p = config.patch_size
    args = (jnp.zeros((1, 1, p, p, 3)), np.zeros(1, np.int32), np.zeros(1, np.int32), np.ones(1, np.int32))
    return jax.eval_shape(lambda: MUSIQ(config).init(jax.random.key(0), *args))["params"]


def convert_state_dict(tensors: Mapping, config: MUSIQConfig = KONIQ, source: str = "state dict") -> dict:
    """Strictly checked torch state dict {key: array} -> Flax params (numpy fp32)."""
    return convert_checked(source, tensors, *_rules(config), abstract_params(config))


def convert(src: str, dst: str, config: MUSIQConfig = KONIQ) -> MUSIQConfig:
    """pyiqa MUSIQ .pth -> orbax params + JSON config in `dst` (read by evaluation.scoring.load_musiq)."""
    return torch_pickle.convert_torch_file(src, dst, "musiq", config, convert_state_dict)
