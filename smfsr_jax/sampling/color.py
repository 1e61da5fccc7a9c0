"""Colour correction of the 8-bit SR output against the bicubic-upsampled LR.

StableSR's `adain_color_fix` / `wavelet_color_fix` as used by the SMFSR, DiT4SR and OSEDiff test scripts: both
images are 8-bit, read as /255 float32 (torchvision ToTensor); the result is clamped to [0, 1] and converted back
to 8 bits by truncation (ToPILImage's `mul(255).byte()`). `rounding="round"` rounds instead (off for protocol
runs). 'none' returns the SR image untouched.
"""

import jax.numpy as jnp
import numpy as np

from smfsr_jax.core.images import to_unit

METHODS = ("adain", "wavelet", "none")
ROUNDINGS = ("truncate", "round")
ADAIN_EPS = 1e-5
WAVELET_LEVELS = 5
WAVELET_KERNEL = np.array([[1, 2, 1], [2, 4, 2], [1, 2, 1]], np.float32) / 16


def _mean_std(images, eps: float):
    """Per image and channel over H·W: mean and sqrt(unbiased variance + eps), shaped (B, 1, 1, C)."""
    count = images.shape[1] * images.shape[2]
    mean = jnp.mean(images, axis=(1, 2), keepdims=True)
    variance = jnp.sum(jnp.square(images - mean), axis=(1, 2), keepdims=True) / (count - 1)
    return mean, jnp.sqrt(variance + eps)


def adain(images, source, eps: float = ADAIN_EPS):
    """(B, H, W, C) float: each channel of `images` takes the mean and std of the same channel of `source`."""
    mean, std = _mean_std(images, eps)
    source_mean, source_std = _mean_std(source, eps)
    return (images - mean) / std * source_std + source_mean


def wavelet_blur(images, dilation: int):
    """Depthwise 3x3 [[1,2,1],[2,4,2],[1,2,1]]/16 with the given dilation, replicate padding by `dilation`."""
    _, height, width, _ = images.shape
    padded = jnp.pad(images, ((0, 0), (dilation, dilation), (dilation, dilation), (0, 0)), mode="edge")
    out = jnp.zeros_like(images)
    for i in range(3):
        for j in range(3):
            window = padded[:, i * dilation:i * dilation + height, j * dilation:j * dilation + width]
            out = out + WAVELET_KERNEL[i, j] * window
    return out


def wavelet_decomposition(images, levels: int = WAVELET_LEVELS):
    """À-trous decomposition: (high = Σ_i (level_i − blur_i), final low-pass), dilation 2**i at level i."""
    high = jnp.zeros_like(images)
    low = images
    for level in range(levels):
        blurred = wavelet_blur(low, 2 ** level)
        high = high + (low - blurred)
        low = blurred
    return high, low


def wavelet(images, source, levels: int = WAVELET_LEVELS):
    """High frequencies of `images` + the final low-pass of `source` (same size)."""
    high, _ = wavelet_decomposition(images, levels)
    _, source_low = wavelet_decomposition(source, levels)
    return high + source_low


def color_fix(sr_uint8, source_uint8, method: str = "adain", rounding: str = "truncate"):
    """(B, H, W, 3) uint8 SR and source -> colour-corrected uint8."""
    if method not in METHODS:
        raise ValueError(f"color fix must be one of {METHODS}, got {method!r}")
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    if method == "none":
        return sr_uint8
    sr, source = to_unit(sr_uint8), to_unit(source_uint8)
    fixed = adain(sr, source) if method == "adain" else wavelet(sr, source)
    fixed = jnp.clip(fixed, 0.0, 1.0) * 255.0
    return (jnp.round(fixed) if rounding == "round" else fixed).astype(jnp.uint8)
