"""PSNR and SSIM on BT.601 luma, as pyiqa `psnr` / `ssim` with test_y_channel=True, color_space='ycbcr'.

docs/design.md#psnr-and-ssim. Images are NHWC batches of one size, uint8 or float in [0, 1]. Luma is computed in
float32 as pyiqa does; the rest runs in float64 (enabled locally), which reproduces OSEDiff's DRealSR log
to ~1e-5 dB and ~1e-6 SSIM.
"""

import jax
import jax.numpy as jnp
import numpy as np

from smfsr_jax.core.images import luma
from smfsr_jax.evaluation.io import to_unit_float

_PSNR_EPS = 1e-8
_SSIM_WINDOW_SIZE = 11
_SSIM_SIGMA = 1.5
_SSIM_DATA_RANGE = 255.0


def gaussian_window() -> np.ndarray:
    """MATLAB fspecial('gaussian', 11, 1.5), stored in float32 as pyiqa does, returned as float64."""
    half = (_SSIM_WINDOW_SIZE - 1) / 2.0
    y, x = np.ogrid[-half:half + 1, -half:half + 1]
    window = np.exp(-(x * x + y * y) / (2.0 * _SSIM_SIGMA * _SSIM_SIGMA))
    window[window < np.finfo(window.dtype).eps * window.max()] = 0
    window /= window.sum()
    return window.astype(np.float32).astype(np.float64)


@jax.jit
def _psnr(sr: jax.Array, hr: jax.Array) -> jax.Array:
    diff = luma(sr).astype(jnp.float64) - luma(hr).astype(jnp.float64)
    mse = jnp.mean(diff * diff, axis=(1, 2))
    return 10.0 * jnp.log10(1.0 / (mse + _PSNR_EPS))


def _filter_valid(images: jax.Array, window: jax.Array) -> jax.Array:
    """'valid' 2-D correlation of (..., H, W) with the window, no padding.

    Computed as a circular FFT convolution with the flipped window: its last H-10, W-10 outputs never
    wrap around and equal the direct sums to ~1e-16 relative, at a fraction of a float64 direct conv's cost.
    """
    height, width = images.shape[-2:]
    kh, kw = window.shape
    window_spectrum = jnp.fft.rfft2(window[::-1, ::-1], s=(height, width))
    full = jnp.fft.irfft2(jnp.fft.rfft2(images) * window_spectrum, s=(height, width))
    return full[..., kh - 1:, kw - 1:]


@jax.jit
def _ssim(sr: jax.Array, hr: jax.Array, window: jax.Array) -> jax.Array:
    # pyiqa rounds the 0..255 luma half-to-even (torch.round) before the float64 cast.
    x = jnp.round(luma(sr) * jnp.float32(_SSIM_DATA_RANGE)).astype(jnp.float64)
    y = jnp.round(luma(hr) * jnp.float32(_SSIM_DATA_RANGE)).astype(jnp.float64)
    c1 = (0.01 * _SSIM_DATA_RANGE) ** 2
    c2 = (0.03 * _SSIM_DATA_RANGE) ** 2
    mu1, mu2 = _filter_valid(x, window), _filter_valid(y, window)
    sigma1_sq = _filter_valid(x * x, window) - mu1 * mu1
    sigma2_sq = _filter_valid(y * y, window) - mu2 * mu2
    sigma12 = _filter_valid(x * y, window) - mu1 * mu2
    cs_map = jax.nn.relu((2 * sigma12 + c2) / (sigma1_sq + sigma2_sq + c2))
    ssim_map = ((2 * mu1 * mu2 + c1) / (mu1 * mu1 + mu2 * mu2 + c1)) * cs_map
    return jnp.mean(ssim_map, axis=(1, 2))


def _check_pair(sr: np.ndarray, hr: np.ndarray, min_size: int = 1):
    if sr.shape != hr.shape or sr.ndim != 4 or sr.shape[-1] != 3:
        raise ValueError(f"PSNR/SSIM need two (N, H, W, 3) batches of one shape, got {sr.shape} and {hr.shape}")
    if min(sr.shape[1:3]) < min_size:
        raise ValueError(f"images must be at least {min_size} pixels a side, got {sr.shape[1:3]}")


def psnr(sr, hr) -> np.ndarray:
    """Per-image PSNR (dB) on Y, shape (N,) float64; identical images give 80 dB (eps 1e-8)."""
    sr, hr = to_unit_float(sr), to_unit_float(hr)
    _check_pair(sr, hr)
    with jax.enable_x64(True):
        return np.asarray(_psnr(sr, hr))


def ssim(sr, hr) -> np.ndarray:
    """Per-image SSIM on rounded 0..255 Y with the 11x11 Gaussian window, shape (N,) float64."""
    sr, hr = to_unit_float(sr), to_unit_float(hr)
    _check_pair(sr, hr, min_size=_SSIM_WINDOW_SIZE)
    with jax.enable_x64(True):
        return np.asarray(_ssim(sr, hr, gaussian_window()))

