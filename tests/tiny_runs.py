"""Tiny training runs shared by the training tests (stage configs shrunk to a few seconds per stage)."""

import pathlib

from smfsr_jax.convert.transformer import load_transformer
from smfsr_jax.core import files
from smfsr_jax.training import loop

# Smaller than the demo's tiny configs: 2 blocks of width 32, 32-pixel crops.
TINY_OVERRIDES = {"model.num_layers": 2, "model.dual_attention_layers": (0,), "model.num_heads": 2,
                  "model.head_dim": 16, "data.degradation.crop_size": 32, "batch_size": 8, "log_every": 1,
                  "optimizer.lr": 1e-3, "checkpoint_every": 1000, "image_every": 1000}
STEPS = 60


def tiny(module, data_dir, **overrides):
    """`module.get_config("tiny")` with TINY_OVERRIDES and `overrides` ("a.b" keys) applied."""
    config = module.get_config("tiny")
    for key, value in {**TINY_OVERRIDES, "data.data_dir": data_dir, **overrides}.items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def bundle_params(workdir):
    """The transformer parameters of WORKDIR/bundle (a local path or a bucket URL)."""
    return load_transformer(files.join(workdir, "bundle"))[1]


def run(module, data_dir, workdir, **overrides):
    loop.train(tiny(module, data_dir, **overrides), str(workdir))
    return pathlib.Path(workdir)
