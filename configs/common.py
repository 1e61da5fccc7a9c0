"""Pieces shared by the stage configs: data, optimizer, mesh, logging and the tiny CPU geometry."""

import ml_collections

from smfsr_jax.data import degradation
from smfsr_jax.models import mmdit

VARIANTS = ("sd35m", "tiny")

# The embedded default (training.md §7b): an exactly invertible pixel latent (space-to-depth by 4 and a
# fixed orthogonal map, 48 channels) instead of an untrained VAE, 64-pixel crops, a 3-block MM-DiT. Its
# width (192) must hold a whole 2x2x48 patch: the velocity target carries the full-dimensional noise.
TINY_CROP = 64
TINY_MODEL = dict(num_layers=3, num_heads=6, head_dim=32, in_channels=48, out_channels=48,
                  joint_attention_dim=32, pooled_projection_dim=32, pos_embed_max_size=32, sample_size=16,
                  dual_attention_layers=(0, 1))


def check_variant(arg: str) -> str:
    variant = arg or "sd35m"
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    return variant


def base_config(variant: str) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.variant = variant
    c.seed = 0
    tiny = variant == "tiny"

    c.data = ml_collections.ConfigDict(dict(
        dataset="bundled" if tiny else "lsdir", split="train",
        data_dir=ml_collections.config_dict.placeholder(str),
        captions=False,  # read cached caption embeddings (python -m smfsr_jax.data.captions)
        text_dropout=0.2, worker_count=0 if tiny else 8, worker_buffer_size=2))
    c.data.degradation = degradation.default_config()
    c.data.degradation.crop_size = TINY_CROP if tiny else 512

    c.autoencoder = ml_collections.ConfigDict(
        dict(kind="pixel", downscale=4, latent_channels=48, path=None) if tiny else
        dict(kind="kl", path=ml_collections.config_dict.placeholder(str), dtype="bfloat16"))
    c.text = ml_collections.ConfigDict(dict(
        encoders=ml_collections.config_dict.placeholder(str),  # converted text encoders, referenced by the bundle
        t5_max_length=77,
        # NULL embeddings: "dataset" (the caption cache), an .npz path, or "placeholder" (tiny runs).
        null="placeholder" if tiny else "dataset",
        context_length=8))

    c.optimizer = ml_collections.ConfigDict(dict(lr=5e-5, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-2, clip=1.0))
    c.ema_decay = ml_collections.config_dict.placeholder(float)
    c.frozen_dtype = "float32" if tiny else "bfloat16"

    # Tuples, so that --config.mesh="(('data', 4), ('fsdp', 2))" can override them from the command line.
    c.mesh = (("data", -1), ("fsdp", 1))
    c.sharding_rules = (("pos_embed/pos_embed", "replicate"), (".*", "fsdp"))

    c.log_every = 10 if tiny else 50
    c.checkpoint_every = 100 if tiny else 1000
    c.keep_checkpoints = 2 if tiny else 3
    c.image_every = 100 if tiny else 1000
    c.profile = False
    return c


def model_config(variant: str, preset: str, **overrides) -> ml_collections.ConfigDict:
    if variant == "tiny":
        cfg = mmdit.MMDiTConfig.tiny(**{**TINY_MODEL, **overrides})
        cfg = cfg.replace(lr_stream=True, **({"time_conditioning": "interval", "time_scale": 1.0}
                                               if preset == "smfsr_student" else {}))
    else:
        cfg = mmdit.PRESETS[preset](**{"dtype": "bfloat16", "remat_policy": "full",
                                       **overrides})
    return ml_collections.ConfigDict({**cfg.to_dict(), "dual_attention_layers": cfg.dual_attention_layers})
