"""Real-ESRGAN second-order degradation (OSEDiff 512 variant) in numpy/OpenCV, one image at a time.

Follows the standard parameters of xinntao/Real-ESRGAN `train_realesrgan_x4plus.yml` (OSEDiff
`params_realesrgan.yml`), the kernels of BasicSR `degradations.py`, and the procedure of OSEDiff
`dataloaders/realesrgan.py` with every random choice made per sample. Deviations from those references
are none by intent; the choices that need a word:

- Resizes follow `torch.nn.functional.interpolate` exactly (align_corners False, no antialias):
  bicubic with a = -0.75 and clamped borders, bilinear with the source index clamped at 0, and "area"
  = adaptive average pooling. The first resize is called with a scale factor, so (as in torch) its
  sampling grid uses 1/scale rather than in/out. `jax.image.resize` is not equivalent.
- JPEG is a numpy port of BasicSR's DiffJPEG in non-differentiable mode: a real quantising codec
  (RGB -> YCbCr, 4:2:0 by 2x2 averaging, 8x8 DCT, the standard tables in BasicSR's transposed
  orientation scaled by the quality factor, rounding, inverse), zero-padded to a multiple of 16.
  It is the encoder the references train with; libjpeg (cv2/PIL) gives slightly different artefacts.
- Blur is `cv2.filter2D` with reflect-101 borders: BasicSR's `filter2D` (reflect pad + conv2d) is the
  same correlation.
- Randomness comes only from the `np.random.Generator` passed in; the pipeline seeds it from
  (seed, epoch, record index), so an example is reproducible on any worker or after a resume.

`degrade(hr, rng, config)` takes an HR crop in [0, 1] and returns (HR, LR) with LR of size HR/scale,
rounded to 8 bits. `upsample_lr` is the model's input path: bicubic x`scale`, clamp, 8-bit rounding.
"""

import functools
import math

import cv2
import ml_collections
import numpy as np
import scipy.fft
import scipy.sparse
import scipy.special

KERNEL_TYPES = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")
RESIZE_MODES = ("area", "bilinear", "bicubic")
_BICUBIC_A = -0.75
_DIRECT_FILTER_MAX = 11  # cv2.filter2D switches to a slow DFT above this kernel size


def default_config() -> ml_collections.ConfigDict:
    """Every degradation parameter; the defaults are the standard Real-ESRGAN x4plus / OSEDiff ones."""
    # What the two degradation orders share; each adds its own blur, resize and noise settings.
    both = dict(kernel_prob=(0.45, 0.25, 0.12, 0.03, 0.12, 0.03), sinc_prob=0.1, betag_range=(0.5, 4.0),
                betap_range=(1.0, 2.0), gaussian_noise_prob=0.5, gray_noise_prob=0.4, jpeg_range=(30.0, 95.0))
    first = dict(both, blur_sigma=(0.2, 3.0), blur_prob=1.0, resize_prob=(0.2, 0.7, 0.1), resize_range=(0.15, 1.5),
                 noise_range=(1.0, 30.0), poisson_scale_range=(0.05, 3.0))
    second = dict(both, blur_sigma=(0.2, 1.5), blur_prob=0.8, resize_prob=(0.3, 0.4, 0.3), resize_range=(0.3, 1.2),
                  noise_range=(1.0, 25.0), poisson_scale_range=(0.05, 2.5))
    return ml_collections.ConfigDict(dict(
        crop_size=512,  # HR crop side; the LR side is crop_size // scale
        scale=4,
        kernel_sizes=(7, 9, 11, 13, 15, 17, 19, 21),  # odd sizes drawn uniformly, zero-padded to 21
        kernel_pad_to=21,
        first=first,
        second=second,
        final_sinc_prob=0.8,
        # USM sharpening of the GT before degrading (Real-ESRGAN); OSEDiff's 512 recipe keeps it off.
        use_sharpen=False,
        sharpen_weight=0.5,
        sharpen_radius=50,
        sharpen_threshold=10,
    ))


# ----------------------------------------------------------------------------- kernels


def _kernel_grid(size: int) -> np.ndarray:
    """(size, size, 2) grid of (x, y) offsets from the centre; x runs along columns."""
    ax = np.arange(-size // 2 + 1.0, size // 2 + 1.0)
    xx, yy = np.meshgrid(ax, ax)
    return np.stack([xx, yy], axis=-1)


def _quadratic_form(size: int, sigma_x: float, sigma_y: float, theta: float) -> np.ndarray:
    """d^T Sigma^-1 d on the kernel grid, Sigma = R diag(sx^2, sy^2) R^T."""
    rotation = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    sigma = rotation @ np.diag([sigma_x ** 2, sigma_y ** 2]) @ rotation.T
    grid = _kernel_grid(size)
    return np.sum((grid @ np.linalg.inv(sigma)) * grid, axis=-1)


def gaussian_kernel(size, sigma_x, sigma_y, theta, kind="gaussian", beta=1.0) -> np.ndarray:
    """Normalised Gaussian, generalized-Gaussian or plateau kernel (BasicSR formulas)."""
    q = _quadratic_form(size, sigma_x, sigma_y, theta)
    if kind == "gaussian":
        kernel = np.exp(-0.5 * q)
    elif kind == "generalized":
        kernel = np.exp(-0.5 * np.power(q, beta))
    elif kind == "plateau":
        kernel = 1.0 / (np.power(q, beta) + 1.0)
    else:
        raise ValueError(f"unknown kernel kind {kind!r}")
    return kernel / kernel.sum()


def sinc_kernel(cutoff: float, size: int) -> np.ndarray:
    """Circular low-pass (2-D sinc) kernel: w*J1(w*r)/(2*pi*r), centre w^2/(4*pi), sum 1."""
    centre = (size - 1) / 2
    yy, xx = np.mgrid[:size, :size]
    r = np.hypot(xx - centre, yy - centre)
    with np.errstate(divide="ignore", invalid="ignore"):
        kernel = cutoff * scipy.special.j1(cutoff * r) / (2 * np.pi * r)
    kernel[size // 2, size // 2] = cutoff ** 2 / (4 * np.pi)
    return kernel / kernel.sum()


def _pad_kernel(kernel: np.ndarray, size: int) -> np.ndarray:
    pad = (size - kernel.shape[0]) // 2
    return np.pad(kernel, pad)


def _draw_beta(rng: np.random.Generator, beta_range) -> float:
    # Half below 1, half above (BasicSR); with range (1, 2) the lower half is exactly 1.
    if rng.uniform() < 0.5:
        return rng.uniform(beta_range[0], 1.0)
    return rng.uniform(1.0, beta_range[1])


def random_blur_kernel(rng: np.random.Generator, stage, config) -> tuple[np.ndarray, str]:
    """One first- or second-order blur kernel, padded to `kernel_pad_to`; returns (kernel, type)."""
    size = int(rng.choice(config.kernel_sizes))
    if rng.uniform() < stage.sinc_prob:
        cutoff = rng.uniform(np.pi / 3, np.pi) if size < 13 else rng.uniform(np.pi / 5, np.pi)
        return _pad_kernel(sinc_kernel(cutoff, size), config.kernel_pad_to), "sinc"
    kernel_type = KERNEL_TYPES[rng.choice(len(KERNEL_TYPES), p=np.asarray(stage.kernel_prob))]
    sigma_x = rng.uniform(*stage.blur_sigma)
    if kernel_type.endswith("aniso"):
        sigma_y = rng.uniform(*stage.blur_sigma)
        theta = rng.uniform(-np.pi, np.pi)
    else:
        sigma_y, theta = sigma_x, 0.0
    if kernel_type.startswith("generalized"):
        kernel = gaussian_kernel(size, sigma_x, sigma_y, theta, "generalized", _draw_beta(rng, stage.betag_range))
    elif kernel_type.startswith("plateau"):
        kernel = gaussian_kernel(size, sigma_x, sigma_y, theta, "plateau", _draw_beta(rng, stage.betap_range))
    else:
        kernel = gaussian_kernel(size, sigma_x, sigma_y, theta)
    return _pad_kernel(kernel, config.kernel_pad_to), kernel_type


def random_final_sinc(rng: np.random.Generator, config) -> np.ndarray | None:
    """The final sinc kernel (cutoff U(pi/3, pi)), or None for the identity pulse."""
    if rng.uniform() >= config.final_sinc_prob:
        return None
    size = int(rng.choice(config.kernel_sizes))
    return _pad_kernel(sinc_kernel(rng.uniform(np.pi / 3, np.pi), size), config.kernel_pad_to)


def filter2d(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Correlation with reflect-101 borders (BasicSR filter2D) on an (H, W, C) float32 image.

    The zero ring of a padded kernel is dropped first (same result, less work). Rank-one kernels run as
    two 1-D passes, small ones through cv2's direct filter; from 13x13 on, an FFT is about twice as
    fast as cv2's single-thread DFT path. All agree with the direct correlation to ~1e-6.
    """
    nonzero = np.flatnonzero(np.any(kernel != 0, axis=0) | np.any(kernel != 0, axis=1))
    ring = min(nonzero[0], kernel.shape[0] - 1 - nonzero[-1])
    kernel = np.ascontiguousarray(kernel[ring:kernel.shape[0] - ring, ring:kernel.shape[1] - ring], np.float32)
    size = kernel.shape[0]
    centre = size // 2
    column, row = kernel[:, centre], kernel[centre, :]
    if kernel[centre, centre] > 0 and np.allclose(
            np.outer(column, row) / kernel[centre, centre], kernel, rtol=0, atol=1e-7 * kernel.max()):
        # Rank one (every isotropic Gaussian): two 1-D passes.
        return cv2.sepFilter2D(img, -1, row, column / kernel[centre, centre], borderType=cv2.BORDER_REFLECT_101)
    if size <= _DIRECT_FILTER_MAX:
        return cv2.filter2D(img, -1, kernel, borderType=cv2.BORDER_REFLECT_101)
    half = size // 2
    padded = cv2.copyMakeBorder(img, half, half, half, half, cv2.BORDER_REFLECT_101).reshape(
        img.shape[0] + 2 * half, img.shape[1] + 2 * half, -1)
    shape = [scipy.fft.next_fast_len(n, real=True) for n in padded.shape[:2]]
    spectrum = scipy.fft.rfft2(padded, s=shape, axes=(0, 1))
    spectrum *= scipy.fft.rfft2(kernel[::-1, ::-1], s=shape)[..., None]  # flipped: correlation
    out = scipy.fft.irfft2(spectrum, s=shape, axes=(0, 1))
    return np.ascontiguousarray(out[size - 1:size - 1 + img.shape[0], size - 1:size - 1 + img.shape[1]])


# ----------------------------------------------------------------------------- resize


@functools.lru_cache(maxsize=256)
def resize_matrix(in_size: int, out_size: int, mode: str, scale_factor: float | None = None,
                  channels: int = 1) -> scipy.sparse.csr_matrix:
    """(out_size*channels, in_size*channels) sparse matrix of torch's 1-D interpolation along one axis.

    With channels > 1 it acts on rows laid out as (position, channel), channels interleaved.
    """
    out = np.arange(out_size)
    if mode == "area":  # adaptive average pooling: window [floor(i*in/out), ceil((i+1)*in/out))
        start = (out * in_size) // out_size
        end = -((-(out + 1) * in_size) // out_size)
        taps = int(np.max(end - start))
        index = np.minimum(start[:, None] + np.arange(taps)[None], in_size - 1)
        weight = (start[:, None] + np.arange(taps)[None] < end[:, None]) / (end - start)[:, None]
    elif mode in ("bilinear", "bicubic"):
        # torch builds the sampling grid in float32 for float32 images
        ratio = np.float32(1.0 / scale_factor if scale_factor else in_size / out_size)
        source = (out.astype(np.float32) + np.float32(0.5)) * ratio - np.float32(0.5)
        if mode == "bilinear":
            source = np.maximum(source, 0.0)
            first = np.floor(source).astype(np.int64)
            frac = source - first
            index = np.stack([first, np.minimum(first + 1, in_size - 1)], axis=1)
            weight = np.stack([1.0 - frac, frac], axis=1)
        else:
            first = np.floor(source).astype(np.int64)
            t = source - first
            a = _BICUBIC_A
            near = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1  # |x| <= 1
            far = lambda x: ((a * x - 5 * a) * x + 8 * a) * x - 4 * a  # 1 < |x| < 2
            weight = np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=1)
            index = np.clip(first[:, None] + np.arange(-1, 3)[None], 0, in_size - 1)
    else:
        raise ValueError(f"unknown resize mode {mode!r}; expected one of {RESIZE_MODES}")
    taps = index.shape[1]
    index = (index[:, None, :] * channels + np.arange(channels)[None, :, None]).reshape(-1, taps)
    weight = np.repeat(weight, channels, axis=0)
    # Clamped taps repeat an index; CSR sums duplicates, as torch's clamped reads do.
    return scipy.sparse.csr_matrix(
        (weight.astype(np.float32).ravel(), index.ravel(), np.arange(0, index.size + 1, taps)),
        shape=(out_size * channels, in_size * channels))


def resize(img: np.ndarray, size: tuple[int, int], mode: str, scale_factor: float | None = None) -> np.ndarray:
    """`F.interpolate(img, size, mode)` on an (H, W, C) float32 image, torch CPU semantics.

    With `scale_factor` the sampling grid uses 1/scale_factor (torch's `scale_factor=` call); `size`
    must then be floor(in * scale_factor). Separable: one sparse matrix per axis.
    """
    height, width, channels = img.shape
    out_height, out_width = size
    identity = mode == "area" or not scale_factor or scale_factor == 1.0
    resize_rows = not (out_height == height and identity)
    resize_cols = not (out_width == width and identity)
    if resize_rows and out_height > height:  # upscaling: the width pass is cheaper on fewer rows
        img = _resize_cols(img, out_width, mode, scale_factor) if resize_cols else img
        return _resize_rows(img, out_height, mode, scale_factor)
    img = _resize_rows(img, out_height, mode, scale_factor) if resize_rows else img
    return _resize_cols(img, out_width, mode, scale_factor) if resize_cols else img


def _resize_rows(img, out_height, mode, scale_factor):
    height, width, channels = img.shape
    rows = resize_matrix(height, out_height, mode, scale_factor)
    return (rows @ img.reshape(height, -1)).reshape(out_height, width, channels)


def _resize_cols(img, out_width, mode, scale_factor):
    height, width, channels = img.shape
    cols = resize_matrix(width, out_width, mode, scale_factor, channels)
    # cv2.transpose is a fast 2-D transpose; scipy wants the resized axis first.
    return cv2.transpose(cols @ cv2.transpose(img.reshape(height, -1))).reshape(height, out_width, channels)


def quantize_8bit(img: np.ndarray) -> np.ndarray:
    """clamp(round(255 x), 0, 255) / 255, as float32."""
    out = np.multiply(img, np.float32(255.0), dtype=np.float32)
    np.round(out, out=out)
    np.clip(out, 0.0, 255.0, out=out)
    return np.divide(out, np.float32(255.0), out=out)


def to_uint8(img: np.ndarray) -> np.ndarray:
    """[0, 1] float image -> uint8 levels (exact for images already on the 8-bit grid)."""
    return np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)


def upsample_lr(lr: np.ndarray, scale: int = 4) -> np.ndarray:
    """The model's LR input: torch bicubic x`scale`, clamped to [0, 1] and rounded to 8 bits."""
    height, width = lr.shape[:2]
    return quantize_8bit(resize(lr.astype(np.float32), (height * scale, width * scale), "bicubic"))


# ----------------------------------------------------------------------------- noise


def _luma(img: np.ndarray) -> np.ndarray:
    """torchvision rgb_to_grayscale weights, keeping a channel axis."""
    return cv2.transform(img, np.array([[0.2989, 0.587, 0.114]], np.float32))[..., None]


def gaussian_noise(img, rng, sigma: float, gray: bool) -> np.ndarray:
    """Additive N(0, sigma/255); gray noise is one plane shared by R, G and B. Clipped to [0, 1]."""
    height, width, channels = img.shape
    noise = rng.standard_normal((height, width, 1 if gray else channels), dtype=np.float32)
    return np.clip(img + noise * np.float32(sigma / 255.0), 0.0, 1.0)


def poisson_noise(img, rng, scale: float, gray: bool) -> np.ndarray:
    """Shot noise on the 8-bit-quantised image (or its luma), vals = 2^ceil(log2(#levels))."""
    source = _luma(img) if gray else img
    levels = np.clip(np.round(source * 255.0), 0, 255)
    count = np.count_nonzero(np.bincount(levels.astype(np.uint8).ravel(), minlength=256))
    vals = 2.0 ** np.ceil(np.log2(count))
    quantized = levels / 255.0
    noise = rng.poisson(quantized * vals) / vals - quantized
    return np.clip(img + (noise * scale).astype(np.float32), 0.0, 1.0)


def random_noise(img, rng, stage, kind: str, trace: dict, gray_key: str) -> np.ndarray:
    """Gaussian or Poisson noise of one degradation stage; records the gray-noise draw in `trace`."""
    gray = bool(rng.uniform() < stage.gray_noise_prob)
    trace[gray_key] = gray
    if kind == "gaussian":
        return gaussian_noise(img, rng, rng.uniform(*stage.noise_range), gray)
    return poisson_noise(img, rng, rng.uniform(*stage.poisson_scale_range), gray)


# ----------------------------------------------------------------------------- JPEG (DiffJPEG port)

# Standard JPEG quantisation tables, transposed as in BasicSR's DiffJPEG.
_Y_TABLE = np.array(
    [[16, 11, 10, 16, 24, 40, 51, 61], [12, 12, 14, 19, 26, 58, 60, 55], [14, 13, 16, 24, 40, 57, 69, 56],
     [14, 17, 22, 29, 51, 87, 80, 62], [18, 22, 37, 56, 68, 109, 103, 77], [24, 35, 55, 64, 81, 104, 113, 92],
     [49, 64, 78, 87, 103, 121, 120, 101], [72, 92, 95, 98, 112, 100, 103, 99]], np.float32).T
_C_TABLE = np.full((8, 8), 99, np.float32)
_C_TABLE[:4, :4] = np.array([[17, 18, 24, 47], [18, 21, 26, 66], [24, 26, 56, 99], [47, 66, 99, 99]]).T
# Colour transforms as cv2.transform matrices (3x4: linear part and offset), DiffJPEG's coefficients.
_RGB_TO_YCBCR = np.array([[0.299, 0.587, 0.114, 0.0], [-0.168736, -0.331264, 0.5, 128.0],
                          [0.5, -0.418688, -0.081312, 128.0]], np.float32)
_YCBCR_TO_RGB = np.array([[1.0, 0.0, 1.402], [1.0, -0.344136, -0.714136], [1.0, 1.772, 0.0]], np.float32)
_YCBCR_TO_RGB = np.concatenate([_YCBCR_TO_RGB, -128.0 * _YCBCR_TO_RGB[:, 1:].sum(1, keepdims=True)], axis=1)


def _dct_matrix() -> np.ndarray:
    """Orthonormal 8-point DCT-II: block -> D @ block @ D.T equals DiffJPEG's scaled 2-D DCT."""
    k = np.arange(8)
    alpha = np.array([1 / np.sqrt(2)] + [1.0] * 7)
    return (0.5 * alpha[:, None] * np.cos((2 * k[None, :] + 1) * k[:, None] * np.pi / 16)).astype(np.float32)


_DCT = _dct_matrix()


def jpeg_quality_factor(quality: float) -> float:
    return (5000.0 / quality if quality < 50 else 200.0 - 2.0 * quality) / 100.0


def _blockwise(plane: np.ndarray, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """left @ block @ right for every 8x8 block of an (H, W) plane, keeping the block layout."""
    height, width = plane.shape
    out = np.matmul(left, plane.reshape(height // 8, 8, width))
    return np.matmul(out.reshape(height, width // 8, 8), right).reshape(height, width)


def _jpeg_plane(plane: np.ndarray, table: np.ndarray) -> np.ndarray:
    """DCT, quantise (round half to even, as torch.round), dequantise, inverse DCT of one plane."""
    height, width = plane.shape
    table = np.tile(table, (height // 8, width // 8))
    coefficients = _blockwise(plane - 128.0, _DCT, _DCT.T)
    return _blockwise(np.round(coefficients / table) * table, _DCT.T, _DCT) + 128.0


def jpeg(img: np.ndarray, quality: float) -> np.ndarray:
    """DiffJPEG (non-differentiable) round trip of an (H, W, 3) image in [0, 1]; float32 output."""
    height, width = img.shape[:2]
    factor = np.float32(jpeg_quality_factor(quality))
    padded = np.pad(np.clip(img, 0.0, 1.0) * np.float32(255.0), ((0, -height % 16), (0, -width % 16), (0, 0)))
    ycbcr = cv2.transform(padded, _RGB_TO_YCBCR)
    luma = _jpeg_plane(ycbcr[..., 0], _Y_TABLE * factor)
    chroma = 0.25 * (ycbcr[0::2, 0::2, 1:] + ycbcr[1::2, 0::2, 1:] + ycbcr[0::2, 1::2, 1:] + ycbcr[1::2, 1::2, 1:])
    chroma = [_jpeg_plane(chroma[..., c], _C_TABLE * factor) for c in range(2)]
    chroma = [plane.repeat(2, axis=0).repeat(2, axis=1) for plane in chroma]
    restored = cv2.transform(np.stack([luma] + chroma, axis=-1), _YCBCR_TO_RGB)
    return np.clip(restored[:height, :width], 0.0, 255.0) / np.float32(255.0)


# ----------------------------------------------------------------------------- sharpening


def usm_sharpen(img: np.ndarray, weight=0.5, radius=50, threshold=10) -> np.ndarray:
    """Unsharp masking with a soft threshold mask (BasicSR USMSharp), reflect-101 borders."""
    radius += 1 - radius % 2
    blur = cv2.GaussianBlur(img, (radius, radius), 0, borderType=cv2.BORDER_REFLECT_101)
    residual = img - blur
    mask = (np.abs(residual) * 255 > threshold).astype(np.float32)
    soft_mask = cv2.GaussianBlur(mask, (radius, radius), 0, borderType=cv2.BORDER_REFLECT_101)
    sharp = np.clip(img + weight * residual, 0.0, 1.0)
    return (soft_mask * sharp + (1 - soft_mask) * img).astype(np.float32)


# ----------------------------------------------------------------------------- procedure


def _random_scale(rng, stage) -> float:
    direction = rng.choice(3, p=np.asarray(stage.resize_prob))  # up, down, keep
    if direction == 0:
        return rng.uniform(1.0, stage.resize_range[1])
    if direction == 1:
        return rng.uniform(stage.resize_range[0], 1.0)
    return 1.0


def _random_mode(rng) -> str:
    return RESIZE_MODES[rng.integers(len(RESIZE_MODES))]


def degrade(hr: np.ndarray, rng: np.random.Generator, config: ml_collections.ConfigDict,
            trace: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Second-order degradation of one HR crop (H, W, 3) float32 in [0, 1].

    Returns (hr, lr): hr is the input (USM-sharpened when `config.use_sharpen`), lr is
    (H // scale, W // scale, 3) float32 rounded to 8 bits. `trace`, when given, receives the branch
    taken at every random choice (kernel types, resize directions and modes, noise kinds, order).
    """
    trace = {} if trace is None else trace
    hr = np.ascontiguousarray(hr, dtype=np.float32)
    if config.use_sharpen:
        hr = usm_sharpen(hr, config.sharpen_weight, config.sharpen_radius, config.sharpen_threshold)
    height, width = hr.shape[:2]
    lr_size = (max(1, height // config.scale), max(1, width // config.scale))
    kernel1, trace["kernel1"] = random_blur_kernel(rng, config.first, config)
    kernel2, trace["kernel2"] = random_blur_kernel(rng, config.second, config)
    final_sinc = random_final_sinc(rng, config)
    trace["final_sinc"] = final_sinc is not None

    # First degradation: blur, resize by a scale factor, noise, JPEG.
    out = filter2d(hr, kernel1) if rng.uniform() < config.first.blur_prob else hr
    scale = _random_scale(rng, config.first)
    trace["resize1"] = "keep" if scale == 1.0 else ("up" if scale > 1.0 else "down")
    trace["mode1"] = _random_mode(rng)
    size = (max(1, math.floor(height * scale)), max(1, math.floor(width * scale)))
    out = resize(out, size, trace["mode1"], scale_factor=scale)
    trace["noise1"] = "gaussian" if rng.uniform() < config.first.gaussian_noise_prob else "poisson"
    out = random_noise(out, rng, config.first, trace["noise1"], trace, "gray1")
    out = jpeg(out, rng.uniform(*config.first.jpeg_range))

    # Second degradation: blur (sometimes), resize to (H/scale)*s2, noise.
    trace["blur2"] = bool(rng.uniform() < config.second.blur_prob)
    if trace["blur2"]:
        out = filter2d(out, kernel2)
    scale = _random_scale(rng, config.second)
    trace["resize2"] = "keep" if scale == 1.0 else ("up" if scale > 1.0 else "down")
    trace["mode2"] = _random_mode(rng)
    size = (max(1, int(height / config.scale * scale)), max(1, int(width / config.scale * scale)))
    out = resize(out, size, trace["mode2"])
    trace["noise2"] = "gaussian" if rng.uniform() < config.second.gaussian_noise_prob else "poisson"
    out = random_noise(out, rng, config.second, trace["noise2"], trace, "gray2")

    # Final: [resize to LR + sinc] and JPEG, in either order.
    trace["order"] = "resize_first" if rng.uniform() < 0.5 else "jpeg_first"
    if trace["order"] == "resize_first":
        trace["mode3"] = _random_mode(rng)
        out = resize(out, lr_size, trace["mode3"])
        if final_sinc is not None:
            out = filter2d(out, final_sinc)
        out = jpeg(out, rng.uniform(*config.second.jpeg_range))
    else:
        out = jpeg(out, rng.uniform(*config.second.jpeg_range))
        trace["mode3"] = _random_mode(rng)
        out = resize(out, lr_size, trace["mode3"])
        if final_sinc is not None:
            out = filter2d(out, final_sinc)
    return hr, quantize_8bit(out)

