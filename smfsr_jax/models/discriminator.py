"""DINOv3-feature discriminator D_ψ for stage-2 GAN training (SMFSR Eq. 17-18, StyleGAN-T heads).

The frozen DINOv3 backbone is not part of any trainable tree: `backbone_features(backbone_params, images,
config)` runs it (under stop_gradient on its params, gradients still reach the pixels) and returns one
(B, N, D) token map per tap: registers dropped, CLS added to every patch token. `Discriminator` holds
only the trainable heads, one per tap, each giving one logit per token.

Usage in a training step (the D step may reuse the G step's detached features of the fake image):

    features = backbone_features(dino_params, x_hat, config)                   # G step
    logits = Discriminator(config).apply({'params': heads, 'spectral': sn}, features)
    real, state = Discriminator(config).apply({'params': heads, 'spectral': sn}, real_features,
                                              update_spectral_norm=True, mutable=['spectral'])
    fake = Discriminator(config).apply({'params': heads, **state}, stop_gradient(features))  # D step

SpectralNorm keeps its power-iteration vectors `u` (out,) and `v` (in·k,) in the 'spectral' collection;
they move only on a call with `update_spectral_norm=True` (once per D step, on the real batch).
"""

import dataclasses
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from smfsr_jax.models.dinov3 import DINOv3Config, DINOv3ViT

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DIFFAUGMENT_POLICIES = ("color", "translation", "cutout")


@dataclasses.dataclass(frozen=True)
class DiscriminatorConfig:
    backbone: DINOv3Config = dataclasses.field(default_factory=DINOv3Config.vits16)
    blocks: tuple[int, ...] = (2, 5, 8, 11)  # taps after these layers (0-based), plus the embedding output
    resolution: int | str = 224  # square backbone input side, or "native" to keep the image size
    group_size: int = 8  # BatchNormLocal: statistics over ceil(B / group_size) groups of consecutive samples
    diffaugment: tuple[str, ...] = ()  # subset of DIFFAUGMENT_POLICIES; () is off

    def __post_init__(self):
        if self.resolution != "native" and not (isinstance(self.resolution, int) and self.resolution > 0):
            raise ValueError(f"resolution must be a positive int or 'native', got {self.resolution!r}")
        bad = [b for b in self.blocks if not 0 <= b < self.backbone.num_hidden_layers]
        if bad:
            raise ValueError(f"blocks {bad} out of range for a {self.backbone.num_hidden_layers}-layer backbone")
        unknown = sorted(set(self.diffaugment) - set(DIFFAUGMENT_POLICIES))
        if unknown:
            raise ValueError(f"unknown DiffAugment policies {unknown}; choose from {DIFFAUGMENT_POLICIES}")

    @property
    def tap_names(self) -> tuple[str, ...]:
        return ("embeddings",) + tuple(f"layer_{b}" for b in self.blocks)

    @property
    def hidden_state_indices(self) -> tuple[int, ...]:
        """DINOv3ViT `return_taps` numbering: 0 is the embedding output, b + 1 the output of layer b."""
        return (0,) + tuple(b + 1 for b in self.blocks)

    @classmethod
    def tiny(cls):
        return cls(backbone=DINOv3Config.tiny(), blocks=(0, 1), resolution=32)


def preprocess(images, resolution: int | str):
    """Images in [-1, 1] (B, H, W, 3) -> (x + 1)/2, bilinear antialiased resize to resolution² (unless
    "native"), ImageNet mean/std."""
    x = (images.astype(jnp.float32) + 1.0) / 2.0
    batch, height, width, channels = x.shape
    if resolution != "native" and (height, width) != (resolution, resolution):
        x = jax.image.resize(x, (batch, resolution, resolution, channels), method="linear", antialias=True)
    return (x - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)


def diff_augment(images, rng, policy: Sequence[str] = DIFFAUGMENT_POLICIES, translation: float = 0.125,
                 cutout: float = 0.2):
    """DiffAugment (Zhao et al. 2020, the StyleGAN-T copy) on images in [-1, 1] (B, H, W, C), per sample.

    color: brightness ± 0.5, saturation × U(0, 2), contrast × U(0.5, 1.5); translation: integer shift up to
    `translation`·size with zero fill; cutout: one zeroed rectangle of `cutout`·size.
    """
    batch, height, width, _ = images.shape
    keys = jax.random.split(rng, 7)
    x = images
    rows = jnp.arange(height)[None, :, None]
    cols = jnp.arange(width)[None, None, :]

    def uniform(key):
        return jax.random.uniform(key, (batch, 1, 1, 1), x.dtype)

    if "color" in policy:
        x = x + (uniform(keys[0]) - 0.5)
        channel_mean = x.mean(axis=-1, keepdims=True)
        x = (x - channel_mean) * (uniform(keys[1]) * 2) + channel_mean
        image_mean = x.mean(axis=(1, 2, 3), keepdims=True)
        x = (x - image_mean) * (uniform(keys[2]) + 0.5) + image_mean
    if "translation" in policy:
        shift_h, shift_w = int(height * translation + 0.5), int(width * translation + 0.5)
        source_rows = rows + jax.random.randint(keys[3], (batch, 1, 1), -shift_h, shift_h + 1)
        source_cols = cols + jax.random.randint(keys[4], (batch, 1, 1), -shift_w, shift_w + 1)
        inside = (source_rows >= 0) & (source_rows < height) & (source_cols >= 0) & (source_cols < width)
        shifted = x[jnp.arange(batch)[:, None, None], jnp.clip(source_rows, 0, height - 1),
                    jnp.clip(source_cols, 0, width - 1)]
        x = jnp.where(inside[..., None], shifted, 0)
    if "cutout" in policy:
        size_h, size_w = int(height * cutout + 0.5), int(width * cutout + 0.5)
        top = jax.random.randint(keys[5], (batch, 1, 1), 0, height + 1 - size_h % 2) - size_h // 2
        left = jax.random.randint(keys[6], (batch, 1, 1), 0, width + 1 - size_w % 2) - size_w // 2
        hole = (rows >= top) & (rows < top + size_h) & (cols >= left) & (cols < left + size_w)
        x = x * (1 - hole[..., None].astype(x.dtype))
    return x


def backbone_features(backbone_params, images, config: DiscriminatorConfig, *, rng=None, dtype=jnp.float32,
                      attention_implementation: str | None = None) -> tuple:
    """Frozen DINOv3 token features per tap, each (B, N, D); differentiable w.r.t. `images` only.

    images: (B, H, W, 3) in [-1, 1]. `rng` is required when `config.diffaugment` is on.
    """
    if config.diffaugment:
        if rng is None:
            raise ValueError(f"DiffAugment {config.diffaugment} is on: backbone_features needs an rng")
        images = diff_augment(images, rng, config.diffaugment)
    pixels = preprocess(images, config.resolution)
    backbone = DINOv3ViT(config.backbone, dtype=dtype, attention_implementation=attention_implementation)
    _, taps = backbone.apply({"params": jax.lax.stop_gradient(backbone_params)}, pixels,
                             return_taps=config.hidden_state_indices)
    prefix = config.backbone.num_prefix_tokens
    return tuple(tap[:, prefix:] + tap[:, :1] for tap in taps)


def _l2_normalize(x, eps: float = 1e-12):
    return x / jnp.maximum(jnp.linalg.norm(x), eps)


def _matmul(a, b):
    # Power iteration in full fp32 even where the default matmul precision is lower (TPU, TF32 GPUs).
    return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)


def _torch_uniform_init(fan_in: int):
    """torch Conv1d's default U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / np.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


class SpectralConv1d(nn.Module):
    """Conv1d over tokens (B, N, C_in) -> (B, N, features), circular padding k // 2, with the kernel divided
    by its largest singular value (torch `spectral_norm`: weight as (out, in·k), one power iteration,
    eps 1e-12)."""
    features: int
    kernel_size: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, update_spectral_norm: bool = False):
        in_features, k = x.shape[-1], self.kernel_size
        fan_in = in_features * k
        kernel = self.param("kernel", _torch_uniform_init(fan_in), (k, in_features, self.features))
        bias = self.param("bias", _torch_uniform_init(fan_in), (self.features,))
        def random_unit(size):
            return _l2_normalize(jax.random.normal(self.make_rng("params"), (size,)))

        u = self.variable("spectral", "u", random_unit, self.features)
        v = self.variable("spectral", "v", random_unit, fan_in)
        # torch layout (out, in, k) flattened, so that u and v are torch's weight_u and weight_v.
        weight = kernel.transpose(2, 1, 0).reshape(self.features, fan_in)
        if update_spectral_norm:  # torch's train-mode power iteration, outside the gradient
            frozen = jax.lax.stop_gradient(weight)
            v.value = _l2_normalize(_matmul(frozen.T, u.value))
            u.value = _l2_normalize(_matmul(frozen, v.value))
        sigma = _matmul(u.value, _matmul(weight, v.value))
        kernel = (kernel / sigma).astype(self.dtype)
        x = jnp.pad(x.astype(self.dtype), ((0, 0), (k // 2, k // 2), (0, 0)), mode="wrap")
        y = jax.lax.conv_general_dilated(x, kernel, window_strides=(1,), padding="VALID",
                                         dimension_numbers=("NWC", "WIO", "NWC"))
        return y + bias.astype(self.dtype)


class BatchNormLocal(nn.Module):
    """StyleGAN-T BatchNormLocal on (B, N, C): per channel, mean and biased variance over the tokens of
    ceil(B / group_size) groups of consecutive samples; no running statistics; affine. fp32."""
    group_size: int = 8
    epsilon: float = 1e-5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        batch, tokens, channels = x.shape
        groups = -(-batch // self.group_size)
        if batch % groups:
            raise ValueError(f"BatchNormLocal: batch {batch} does not split into ceil({batch}/{self.group_size}) = "
                             f"{groups} equal groups")
        scale = self.param("scale", nn.initializers.ones, (channels,))
        bias = self.param("bias", nn.initializers.zeros, (channels,))
        grouped = x.astype(jnp.float32).reshape(groups, batch // groups, tokens, channels)
        mean = grouped.mean(axis=(1, 2), keepdims=True)
        var = jnp.square(grouped - mean).mean(axis=(1, 2), keepdims=True)
        y = (grouped - mean) / jnp.sqrt(var + self.epsilon) * scale + bias
        return y.reshape(x.shape).astype(self.dtype)


class DiscriminatorHead(nn.Module):
    """(B, N, C) tokens -> (B, N) logits: SN-conv k1 -> BNL -> LReLU, residual (SN-conv k9 circular -> BNL ->
    LReLU) scaled by 1/sqrt(2), SN-conv k1 to one channel."""
    group_size: int = 8
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, update_spectral_norm: bool = False):
        channels = x.shape[-1]
        h = SpectralConv1d(channels, 1, self.dtype, name="conv_in")(x, update_spectral_norm)
        h = nn.leaky_relu(BatchNormLocal(self.group_size, dtype=self.dtype, name="norm_in")(h), 0.2)
        r = SpectralConv1d(channels, 9, self.dtype, name="conv_res")(h, update_spectral_norm)
        r = nn.leaky_relu(BatchNormLocal(self.group_size, dtype=self.dtype, name="norm_res")(r), 0.2)
        h = (r + h) / math.sqrt(2)
        return SpectralConv1d(1, 1, self.dtype, name="conv_out")(h, update_spectral_norm)[..., 0]


class Discriminator(nn.Module):
    """Trainable heads only: `apply({'params': heads, 'spectral': sn}, features)` with the tuple from
    backbone_features -> (B, sum of N over taps) fp32 logits, taps in `config.tap_names` order."""
    config: DiscriminatorConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features: Sequence, update_spectral_norm: bool = False):
        names = self.config.tap_names
        if len(features) != len(names):
            raise ValueError(f"expected {len(names)} feature maps ({', '.join(names)}), got {len(features)}")
        logits = [DiscriminatorHead(self.config.group_size, self.dtype, name=f"head_{name}")(f, update_spectral_norm)
                  for name, f in zip(names, features)]
        return jnp.concatenate(logits, axis=1).astype(jnp.float32)
