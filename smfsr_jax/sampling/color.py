"""Colour correction of the 8-bit SR output against the bicubic-upsampled LR.

StableSR's `adain_color_fix` / `wavelet_color_fix` as used by the SMFSR, DiT4SR and OSEDiff test scripts: both
images are 8-bit, read as /255 float32 (torchvision ToTensor); the result is clamped to [0, 1] and converted back
to 8 bits by truncation (ToPILImage's `mul(255).byte()`). `rounding="round"` rounds instead (off for protocol
runs). 'none' returns the SR image untouched.

Every function takes an optional `size`: the (rows, columns) of the image at the top left of a larger canvas
(traced), whose correction is then the image's alone; the rest of the canvas is left to the caller.
"""

import jax.numpy as jnp
import numpy as np

from smfsr_jax.core.images import to_unit

METHODS = ("adain", "wavelet", "none")
ROUNDINGS = ("truncate", "round")
ADAIN_EPS = 1e-5
WAVELET_LEVELS = 5
WAVELET_KERNEL = np.array([[1, 2, 1], [2, 4, 2], [1, 2, 1]], np.float32) / 16


def _mean_std(images, eps: float, size=None):
    """Per image and channel over H·W: mean and sqrt(unbiased variance + eps), shaped (B, 1, 1, C)."""
    if size is None:
        count = images.shape[1] * images.shape[2]
        mean = jnp.mean(images, axis=(1, 2), keepdims=True)
        variance = jnp.sum(jnp.square(images - mean), axis=(1, 2), keepdims=True) / (count - 1)
        return mean, jnp.sqrt(variance + eps)
    inside = ((jnp.arange(images.shape[1]) < size[0])[:, None]
              & (jnp.arange(images.shape[2]) < size[1])[None, :])[None, :, :, None]
    count = (size[0] * size[1]).astype(images.dtype)
    mean = jnp.sum(jnp.where(inside, images, 0.0), axis=(1, 2), keepdims=True) / count
    variance = jnp.sum(jnp.where(inside, jnp.square(images - mean), 0.0), axis=(1, 2), keepdims=True) / (count - 1)
    return mean, jnp.sqrt(variance + eps)


def adain(images, source, eps: float = ADAIN_EPS, size=None):
    """(B, H, W, C) float: each channel of `images` takes the mean and std of the same channel of `source`."""
    mean, std = _mean_std(images, eps, size)
    source_mean, source_std = _mean_std(source, eps, size)
    return (images - mean) / std * source_std + source_mean


def _shifted(images, offset: int, axis: int, size=None):
    """images moved by `offset` along axis 1 or 2, repeating the edge (inside `size` when given)."""
    length = images.shape[axis]
    last = length - 1 if size is None else size[axis - 1] - 1
    return jnp.take(images, jnp.clip(jnp.arange(length) + offset, 0, last), axis=axis)


def wavelet_blur(images, dilation: int, size=None):
    """Depthwise 3x3 [[1,2,1],[2,4,2],[1,2,1]]/16 with the given dilation, replicate padding by `dilation`."""
    out = jnp.zeros_like(images)
    for i in range(3):
        rows = _shifted(images, (i - 1) * dilation, 1, size)
        for j in range(3):
            out = out + WAVELET_KERNEL[i, j] * _shifted(rows, (j - 1) * dilation, 2, size)
    return out


def wavelet_decomposition(images, levels: int = WAVELET_LEVELS, size=None):
    """À-trous decomposition: (high = Σ_i (level_i − blur_i), final low-pass), dilation 2**i at level i."""
    high = jnp.zeros_like(images)
    low = images
    for level in range(levels):
        blurred = wavelet_blur(low, 2 ** level, size)
        high = high + (low - blurred)
        low = blurred
    return high, low


def wavelet(images, source, levels: int = WAVELET_LEVELS, size=None):
    """High frequencies of `images` + the final low-pass of `source` (same size)."""
    high, _ = wavelet_decomposition(images, levels, size)
    _, source_low = wavelet_decomposition(source, levels, size)
    return high + source_low


def color_fix(sr_uint8, source_uint8, method: str = "adain", rounding: str = "truncate", size=None):
    """(B, H, W, 3) uint8 SR and source -> colour-corrected uint8."""
    if method not in METHODS:
        raise ValueError(f"color fix must be one of {METHODS}, got {method!r}")
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    if method == "none":
        return sr_uint8
    sr, source = to_unit(sr_uint8), to_unit(source_uint8)
    fixed = adain(sr, source, size=size) if method == "adain" else wavelet(sr, source, size=size)
    fixed = jnp.clip(fixed, 0.0, 1.0) * 255.0
    return (jnp.round(fixed) if rounding == "round" else fixed).astype(jnp.uint8)
