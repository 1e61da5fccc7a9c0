"""Pieces shared by the stage configs: data, optimizer, mesh, logging and the tiny CPU geometry."""

import ml_collections

from smfsr_jax.data import degradation
from smfsr_jax.models import mmdit

VARIANTS = ("sd35m", "tiny")

# The embedded default: no pretrained weights anywhere, so the latent is an exactly invertible pixel latent,
# a 2-level CDF 5/3 wavelet transform (48 channels at 1/4 resolution), and each token is one latent pixel
# (4x4 image pixels). Measured on the demo (docs/experiments.md, tiny geometry): with 8x8-pixel tokens of an
# orthogonal space-to-depth latent the 16-step teacher draws a mosaic (border/interior gradient ratio 2.2),
# and 4x4-pixel tokens of it still one (2.9); the wavelet's synthesis functions overlap their neighbours, so a
# per-token error decodes to a smooth bump instead of a block (ratio 1.05). 32-pixel crops keep the step cheap.
TINY_CROP = 32
# Gains of the wavelet subbands (LL; LH, HL, HH at 1/2; at full resolution): powers of two near 1/std of each
# band over 32-pixel crops of the training photographs (std 2.3; 0.22, 0.23, 0.11; 0.06, 0.06, 0.023), so that
# every band meets unit-variance noise at a comparable scale.
TINY_BAND_SCALES = (0.5, 4.0, 4.0, 8.0, 16.0, 16.0, 32.0)
TINY_MODEL = dict(num_layers=3, num_heads=4, head_dim=32, patch_size=1, in_channels=48, out_channels=48,
                  joint_attention_dim=32, pooled_projection_dim=32, pos_embed_max_size=32, sample_size=8,
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
        # Cached caption embeddings (python -m smfsr_jax.data.captions); without them every sample gets the NULL
        # text, so text dropout and the CFG terms compare NULL with NULL. The tiny data has no captions.
        captions=not tiny,
        text_dropout=0.2, worker_count=0 if tiny else 8, worker_buffer_size=2))
    c.data.degradation = degradation.default_config()
    c.data.degradation.crop_size = TINY_CROP if tiny else 512

    c.autoencoder = ml_collections.ConfigDict(
        dict(kind="pixel", downscale=4, latent_channels=48, pixel_basis="wavelet", band_scales=TINY_BAND_SCALES,
             path=None) if tiny else
        dict(kind="kl", path=ml_collections.config_dict.placeholder(str), dtype="bfloat16"))
    c.text = ml_collections.ConfigDict(dict(
        encoders=ml_collections.config_dict.placeholder(str),  # converted text encoders, referenced by the bundle
        t5_max_length=77,
        # NULL embeddings: "dataset" (the caption cache), an .npz path, or "placeholder" (tiny runs).
        null="placeholder" if tiny else "dataset",
        # DiT4SR's published NULL_*.pt folder: checked against the NULL in use when the teacher is released weights.
        published_null=ml_collections.config_dict.placeholder(str),
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


# Fields that loaded weights decide (their time scale, the base grid of the positional table): a stage that
# loads its network leaves them out of config.model, so that overriding them is an error, not a no-op.
LOADED_FIELDS = ("time_scale", "sample_size")


def model_config(variant: str, preset: str, loaded: bool = False, **overrides) -> ml_collections.ConfigDict:
    """config.model of a stage; `loaded`: the stage starts from weights on disk (module comment above)."""
    if variant == "tiny":
        cfg = mmdit.MMDiTConfig.tiny(**{**TINY_MODEL, **overrides})
        cfg = cfg.replace(lr_stream=True, **({"time_conditioning": "interval"} if preset == "smfsr_student" else {}))
    else:
        cfg = mmdit.PRESETS[preset](**{"dtype": "bfloat16", "remat_policy": "full",
                                       **overrides})
    fields = {k: v for k, v in cfg.to_dict().items() if not (loaded and k in LOADED_FIELDS)}
    return ml_collections.ConfigDict({**fields, "dual_attention_layers": cfg.dual_attention_layers})


def student_config(variant: str) -> ml_collections.ConfigDict:
    """base_config plus what both student stages share: the SMFSR student, loaded from disk, of which only the
    control branch and the interval embedding train."""
    c = base_config(variant)
    c.model = model_config(variant, "smfsr_student", loaded=True)
    c.trainable = ("control", "^time_text_embed_interval/")
    return c
