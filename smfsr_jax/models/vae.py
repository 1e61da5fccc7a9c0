"""SD3 VAE (diffusers `AutoencoderKL`, 16 latent channels) and the exactly invertible pixel latents.

Images are NHWC in [-1, 1]; latents are raw NHWC (normalise with `normalize_latents` before the
MM-DiT). Parameter paths mirror the diffusers names with list indices as `_i` and `to_out.0` as
`to_out`: `encoder/down_blocks_0/resnets_1/conv1/kernel`, `decoder/mid_block/attentions_0/to_q/kernel`.
The pixel latents serve the tiny configs, which have no pretrained weights: an untrained VAE would decode noise.
"""

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from smfsr_jax.models.attention import dot_product_attention

KINDS = ("kl", "pixel")
PIXEL_BASES = ("orthogonal", "wavelet")
DTYPES = ("float32", "bfloat16")
LOGVAR_RANGE = (-30.0, 20.0)
GROUP_NORM_EPS = 1e-6
PIXEL_MATRIX_SEED = 0


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """AutoencoderKL ('kl') or pixel latent ('pixel'); the block fields are unused by 'pixel'."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 16
    norm_num_groups: int = 32
    scaling_factor: float = 1.5305
    shift_factor: float = 0.0609
    kind: str = "kl"
    # Image pixels per latent pixel along each side; for 'kl' it must be 2**(levels - 1).
    downscale: int = 8
    # 'pixel' only: how a downscale x downscale block becomes latent channels (PixelAutoencoder).
    pixel_basis: str = "orthogonal"
    # 'pixel' + 'wavelet' only: gains of the subbands in the MM-DiT's latent space (on top of scaling_factor),
    # (LL, then LH, HL, HH of each level from the coarsest to the finest); () leaves every band at 1.
    band_scales: tuple[float, ...] = ()
    dtype: str = "float32"
    remat: bool = False

    def __post_init__(self):
        object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))
        object.__setattr__(self, "band_scales", tuple(float(g) for g in self.band_scales))
        if self.band_scales:
            levels = self.wavelet_levels
            if self.kind != "pixel" or self.pixel_basis != "wavelet":
                raise ValueError("VAEConfig.band_scales needs kind='pixel' with pixel_basis='wavelet'")
            if len(self.band_scales) != 1 + 3 * levels or min(self.band_scales) <= 0:
                raise ValueError(f"VAEConfig.band_scales: {1 + 3 * levels} positive gains for a {levels}-level "
                                 f"wavelet (LL, then LH, HL, HH per level, coarsest first), got {self.band_scales}")
        if self.kind not in KINDS:
            raise ValueError(f"VAEConfig.kind must be one of {KINDS}, got {self.kind!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"VAEConfig.dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.kind == "kl":
            expected = 2 ** (len(self.block_out_channels) - 1)
            if self.downscale != expected:
                raise ValueError(f"VAEConfig: {len(self.block_out_channels)} levels downscale by {expected}, "
                                 f"but downscale={self.downscale}")
            bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
            if bad:
                raise ValueError(f"VAEConfig: channels {bad} are not divisible by norm_num_groups="
                                 f"{self.norm_num_groups}")
        else:
            pixels = self.in_channels * self.downscale ** 2
            if self.pixel_basis not in PIXEL_BASES:
                raise ValueError(f"VAEConfig.pixel_basis must be one of {PIXEL_BASES}, got {self.pixel_basis!r}")
            if self.pixel_basis == "wavelet" and (self.downscale & (self.downscale - 1) or self.latent_channels != pixels):
                raise ValueError(f"VAEConfig: a wavelet pixel latent needs a power-of-two downscale and latent_channels "
                                 f"= in_channels * downscale**2 = {pixels}, got {self.downscale}, {self.latent_channels}")
            if self.latent_channels < pixels:
                raise ValueError(f"VAEConfig: a pixel latent needs latent_channels >= in_channels * downscale**2 "
                                 f"= {pixels} to be invertible, got {self.latent_channels}")
            if self.out_channels != self.in_channels:
                raise ValueError("VAEConfig: a pixel latent decodes to its input channels "
                                 f"(in_channels={self.in_channels}, out_channels={self.out_channels})")

    @property
    def wavelet_levels(self) -> int:
        """Levels of a wavelet pixel latent: log2(downscale)."""
        return int(self.downscale).bit_length() - 1

    @classmethod
    def sd3(cls, **overrides) -> "VAEConfig":
        """The SD3 / SD3.5 VAE (83,819,683 parameters)."""
        return cls(**overrides)

    @classmethod
    def tiny(cls, **overrides) -> "VAEConfig":
        """A small KL VAE with the SD3 structure and factor 8, for tests."""
        fields = dict(block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8, downscale=8)
        return cls(**{**fields, **overrides})

    @classmethod
    def pixel(cls, downscale: int = 4, latent_channels: int = 48, pixel_basis: str = "orthogonal",
              **overrides) -> "VAEConfig":
        """An exact latent with no weights (tiny CPU demos): PixelAutoencoder."""
        fields = dict(kind="pixel", downscale=downscale, latent_channels=latent_channels, pixel_basis=pixel_basis,
                      scaling_factor=1.0, shift_factor=0.0)
        return cls(**{**fields, **overrides})

    @classmethod
    def from_dict(cls, record: dict) -> "VAEConfig":
        """Inverse of `dataclasses.asdict` after a JSON round trip (lists back to tuples)."""
        unknown = sorted(set(record) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"VAEConfig: unknown fields {unknown}")
        return cls(**record)


def _group_norm(groups: int, dtype: Any, name: str) -> nn.GroupNorm:
    # Two-pass variance in fp32, as torch computes it: the fast E[x^2]-E[x]^2 form loses parity.
    return nn.GroupNorm(num_groups=groups, epsilon=GROUP_NORM_EPS, dtype=dtype, param_dtype=jnp.float32,
                        use_fast_variance=False, force_float32_reductions=True, name=name)


def _conv(features: int, dtype: Any, name: str, kernel: int = 3, stride: int = 1, padding: Any = 1) -> nn.Conv:
    if isinstance(padding, int):
        padding = ((padding, padding), (padding, padding))
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding, dtype=dtype,
                   param_dtype=jnp.float32, name=name)


class ResnetBlock(nn.Module):
    """diffusers ResnetBlock2D without time embedding: GN, SiLU, conv, GN, SiLU, conv, + shortcut."""

    out_channels: int
    norm_num_groups: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = nn.silu(_group_norm(self.norm_num_groups, self.dtype, "norm1")(x))
        h = _conv(self.out_channels, self.dtype, "conv1")(h)
        h = nn.silu(_group_norm(self.norm_num_groups, self.dtype, "norm2")(h))
        h = _conv(self.out_channels, self.dtype, "conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = _conv(self.out_channels, self.dtype, "conv_shortcut", kernel=1, padding=0)(x)
        return x + h


class SpatialSelfAttention(nn.Module):
    """The mid-block attention: GN, one head over all H*W positions with width C, scale 1/sqrt(C), residual."""

    norm_num_groups: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        batch, height, width, channels = x.shape
        h = _group_norm(self.norm_num_groups, self.dtype, "group_norm")(x)
        h = h.reshape(batch, height * width, 1, channels)
        dense = functools.partial(nn.Dense, channels, dtype=self.dtype, param_dtype=jnp.float32)
        q, k, v = dense(name="to_q")(h), dense(name="to_k")(h), dense(name="to_v")(h)
        h = dot_product_attention(q, k, v, scale=1.0 / math.sqrt(channels))
        h = dense(name="to_out")(h.reshape(batch, height * width, channels))
        return x + h.reshape(batch, height, width, channels)


class MidBlock(nn.Module):
    norm_num_groups: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        channels = x.shape[-1]
        x = ResnetBlock(channels, self.norm_num_groups, self.dtype, name="resnets_0")(x)
        x = SpatialSelfAttention(self.norm_num_groups, self.dtype, name="attentions_0")(x)
        return ResnetBlock(channels, self.norm_num_groups, self.dtype, name="resnets_1")(x)


class Downsample(nn.Module):
    """Zero pad right and bottom by one, then a stride-2 3x3 conv without padding (diffusers padding=0)."""

    channels: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return _conv(self.channels, self.dtype, "conv", stride=2, padding=0)(x)


class Upsample(nn.Module):
    """Nearest x2 then a 3x3 conv."""

    channels: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return _conv(self.channels, self.dtype, "conv")(x)


class DownEncoderBlock(nn.Module):
    out_channels: int
    num_layers: int
    norm_num_groups: int
    add_downsample: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        for j in range(self.num_layers):
            x = ResnetBlock(self.out_channels, self.norm_num_groups, self.dtype, name=f"resnets_{j}")(x)
        if self.add_downsample:
            x = Downsample(self.out_channels, self.dtype, name="downsamplers_0")(x)
        return x


class UpDecoderBlock(nn.Module):
    out_channels: int
    num_layers: int
    norm_num_groups: int
    add_upsample: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        for j in range(self.num_layers):
            x = ResnetBlock(self.out_channels, self.norm_num_groups, self.dtype, name=f"resnets_{j}")(x)
        if self.add_upsample:
            x = Upsample(self.out_channels, self.dtype, name="upsamplers_0")(x)
        return x


def _maybe_remat(module_cls, remat: bool):
    return nn.remat(module_cls) if remat else module_cls


class Encoder(nn.Module):
    config: VAEConfig

    @nn.compact
    def __call__(self, images):
        cfg, dtype = self.config, jnp.dtype(self.config.dtype)
        levels = len(cfg.block_out_channels)
        down_block = _maybe_remat(DownEncoderBlock, cfg.remat)
        x = _conv(cfg.block_out_channels[0], dtype, "conv_in")(images.astype(dtype))
        for level, channels in enumerate(cfg.block_out_channels):
            x = down_block(channels, cfg.layers_per_block, cfg.norm_num_groups, level < levels - 1, dtype,
                           name=f"down_blocks_{level}")(x)
        x = _maybe_remat(MidBlock, cfg.remat)(cfg.norm_num_groups, dtype, name="mid_block")(x)
        x = nn.silu(_group_norm(cfg.norm_num_groups, dtype, "conv_norm_out")(x))
        return _conv(2 * cfg.latent_channels, dtype, "conv_out")(x)


class Decoder(nn.Module):
    config: VAEConfig

    @nn.compact
    def __call__(self, latents):
        cfg, dtype = self.config, jnp.dtype(self.config.dtype)
        levels = len(cfg.block_out_channels)
        up_block = _maybe_remat(UpDecoderBlock, cfg.remat)
        x = _conv(cfg.block_out_channels[-1], dtype, "conv_in")(latents.astype(dtype))
        x = _maybe_remat(MidBlock, cfg.remat)(cfg.norm_num_groups, dtype, name="mid_block")(x)
        for i, channels in enumerate(reversed(cfg.block_out_channels)):
            x = up_block(channels, cfg.layers_per_block + 1, cfg.norm_num_groups, i < levels - 1, dtype,
                         name=f"up_blocks_{i}")(x)
        x = nn.silu(_group_norm(cfg.norm_num_groups, dtype, "conv_norm_out")(x))
        return _conv(cfg.out_channels, dtype, "conv_out")(x)


class AutoencoderKL(nn.Module):
    """diffusers AutoencoderKL without quant convs. Outputs are fp32 whatever the compute dtype."""

    config: VAEConfig

    def setup(self):
        if self.config.kind != "kl":
            raise ValueError(f"AutoencoderKL needs a 'kl' config, got kind={self.config.kind!r}")
        self.encoder = Encoder(self.config)
        self.decoder = Decoder(self.config)

    def encode(self, images):
        """images (B, H, W, C) in [-1, 1] -> (mean, logvar), each (B, H/f, W/f, latent_channels)."""
        moments = self.encoder(images).astype(jnp.float32)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)

    def decode(self, latents):
        """Raw latents (B, h, w, latent_channels) -> images (B, h*f, w*f, out_channels)."""
        return self.decoder(latents).astype(jnp.float32)

    def __call__(self, images):
        mean, _ = self.encode(images)
        return self.decode(mean)


@functools.lru_cache(maxsize=None)
def pixel_latent_matrix(pixel_channels: int, latent_channels: int) -> np.ndarray:
    """(pixel_channels, latent_channels) with orthonormal rows: M @ M.T = I, so z @ M.T inverts x @ M.

    The rows of a seeded random orthogonal matrix (QR with a positive R diagonal, hence unique).
    """
    rng = np.random.default_rng(PIXEL_MATRIX_SEED)
    q, r = np.linalg.qr(rng.standard_normal((latent_channels, latent_channels)))
    q = q * np.sign(np.diag(r))[None, :]
    matrix = q[:pixel_channels, :].astype(np.float32)
    matrix.setflags(write=False)
    return matrix


def space_to_depth(x, f: int):
    """(B, H, W, C) -> (B, H/f, W/f, f*f*C), channels ordered (row in block, column in block, C)."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // f, f, w // f, f, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h // f, w // f, f * f * c)


def depth_to_space(x, f: int, channels: int):
    b, h, w, _ = x.shape
    x = x.reshape(b, h, w, f, f, channels).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h * f, w * f, channels)


# CDF 5/3 (LeGall) lifting with symmetric extension, scaled by sqrt(2) so that it is near orthonormal: exactly
# invertible, and its synthesis functions overlap their neighbours (a hat, not a box), so an error in one
# latent pixel decodes to a smooth bump instead of a block with hard edges.
_SQRT2 = float(np.sqrt(2.0))


def _next(a, valid=None):
    """a shifted left along its last axis, the last sample repeated (symmetric extension); with `valid` (traced),
    only the first `valid` samples are the signal, and the last of them is repeated instead."""
    shifted = jnp.concatenate([a[..., 1:], a[..., -1:]], -1)
    if valid is None:
        return shifted
    return jnp.where(jnp.arange(a.shape[-1]) >= valid - 1, a, shifted)


def _previous(a):
    return jnp.concatenate([a[..., :1], a[..., :-1]], -1)


def _lift(x, axis: int, valid=None):
    x = jnp.moveaxis(x, axis, -1)
    even, odd = x[..., 0::2], x[..., 1::2]
    detail = odd - 0.5 * (even + _next(even, None if valid is None else valid // 2))
    smooth = even + 0.25 * (_previous(detail) + detail)
    return jnp.moveaxis(smooth * _SQRT2, -1, axis), jnp.moveaxis(detail / _SQRT2, -1, axis)


def _unlift(smooth, detail, axis: int, valid=None):
    smooth, detail = jnp.moveaxis(smooth, axis, -1) / _SQRT2, jnp.moveaxis(detail, axis, -1) * _SQRT2
    even = smooth - 0.25 * (_previous(detail) + detail)
    odd = detail + 0.5 * (even + _next(even, None if valid is None else valid // 2))
    x = jnp.stack([even, odd], -1).reshape(*even.shape[:-1], 2 * even.shape[-1])
    return jnp.moveaxis(x, -1, axis)


def _halve(valid):
    return None if valid is None else (valid[0] // 2, valid[1] // 2)


def wavelet_encode(x, levels: int, valid=None):
    """(B, H, W, C) -> (B, H/2^L, W/2^L, 4^L C): [coarsest level (recursively) | LH, HL, HH of the finest level
    folded onto the coarse grid]. valid: (rows, columns), traced, of the image at the top left of a larger canvas
    (multiples of 2^L): its coefficients are those of the image alone; the rest is not."""
    if levels == 0:
        return x
    rows, columns = (None, None) if valid is None else valid
    low, high = _lift(x, 2, columns)
    (ll, lh), (hl, hh) = _lift(low, 1, rows), _lift(high, 1, rows)
    fold = 2 ** (levels - 1)
    return jnp.concatenate([wavelet_encode(ll, levels - 1, _halve(valid))]
                           + [space_to_depth(band, fold) for band in (lh, hl, hh)], -1)


def wavelet_decode(z, levels: int, channels: int, valid=None):
    """Exact inverse of `wavelet_encode` (valid: the image's size in pixels on a larger canvas, as there)."""
    if levels == 0:
        return z
    fold = 2 ** (levels - 1)
    coarse, width = channels * fold * fold, channels * fold * fold
    lh, hl, hh = (depth_to_space(z[..., coarse + i * width:coarse + (i + 1) * width], fold, channels)
                  for i in range(3))
    ll = wavelet_decode(z[..., :coarse], levels - 1, channels, _halve(valid))
    rows, columns = (None, None) if valid is None else valid
    return _unlift(_unlift(ll, lh, 1, rows), _unlift(hl, hh, 1, rows), 2, columns)


class PixelAutoencoder(nn.Module):
    """Space-to-depth by `downscale` and a fixed orthogonal channel map ("orthogonal"), or a log2(downscale)-level
    CDF 5/3 wavelet transform ("wavelet"): exact, no parameters."""

    config: VAEConfig

    def _check(self):
        if self.config.kind != "pixel":
            raise ValueError(f"PixelAutoencoder needs a 'pixel' config, got kind={self.config.kind!r}")

    def _matrix(self):
        cfg = self.config
        return jnp.asarray(pixel_latent_matrix(cfg.in_channels * cfg.downscale ** 2, cfg.latent_channels))

    def encode(self, images, valid=None):
        """images (B, H, W, C), H and W multiples of downscale -> (mean, logvar = -30 everywhere). valid: the
        image's (rows, columns) on a larger canvas (traced; multiples of downscale), else the whole input."""
        self._check()
        f = self.config.downscale
        height, width = images.shape[1:3]
        if height % f or width % f:
            raise ValueError(f"PixelAutoencoder: image size {height}x{width} is not a multiple of {f}")
        x = images.astype(jnp.float32)
        if self.config.pixel_basis == "wavelet":
            mean = wavelet_encode(x, self.config.wavelet_levels, valid)
        else:
            mean = jnp.einsum("bhwp,pl->bhwl", space_to_depth(x, f), self._matrix(),
                              precision=jax.lax.Precision.HIGHEST)
        return mean, jnp.full_like(mean, LOGVAR_RANGE[0])

    def decode(self, latents, valid=None):
        """Exact inverse of `encode` on images (the orthogonal projection for other latents); valid as there."""
        self._check()
        cfg, z = self.config, latents.astype(jnp.float32)
        if cfg.pixel_basis == "wavelet":
            return wavelet_decode(z, self.config.wavelet_levels, cfg.out_channels, valid)
        x = jnp.einsum("bhwl,pl->bhwp", z, self._matrix(), precision=jax.lax.Precision.HIGHEST)
        return depth_to_space(x, cfg.downscale, cfg.out_channels)

    def __call__(self, images):
        mean, _ = self.encode(images)
        return self.decode(mean)


def make_autoencoder(config: VAEConfig) -> nn.Module:
    return AutoencoderKL(config) if config.kind == "kl" else PixelAutoencoder(config)


def sample_latent(rng, mean, logvar):
    """A posterior sample mean + exp(logvar / 2) * eps (DiT4SR and SMFSR encode with the sample)."""
    return mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)


def latent_scales(config: VAEConfig) -> np.ndarray:
    """(latent_channels,) gains from raw latents to the MM-DiT's latent space: scaling_factor, times each wavelet
    channel's band gain. The channel order is `wavelet_encode`'s."""
    scales = np.full(config.latent_channels, config.scaling_factor, np.float32)
    if config.band_scales:
        width = config.in_channels
        scales[:width] *= config.band_scales[0]
        for level in range(config.wavelet_levels):  # coarsest first; each finer level's bands hold 4x the channels
            for band in range(3):
                scales[width:width + config.in_channels * 4 ** level] *= config.band_scales[1 + 3 * level + band]
                width += config.in_channels * 4 ** level
    return scales


def _scale(config: VAEConfig):
    # Without band gains the Python scalar keeps the latents' dtype (a float32 array would promote bf16).
    return latent_scales(config) if config.band_scales else config.scaling_factor


def normalize_latents(latents, config: VAEConfig):
    """Raw VAE latents -> the MM-DiT's latent space: (z - shift) * scale (per channel with band_scales)."""
    return (latents - config.shift_factor) * _scale(config)


def denormalize_latents(latents, config: VAEConfig):
    """The MM-DiT's latent space -> raw VAE latents: z / scale + shift."""
    return latents / _scale(config) + config.shift_factor
