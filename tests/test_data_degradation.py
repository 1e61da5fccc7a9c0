"""Real-ESRGAN degradation: torch parity of resize/blur/JPEG, kernels, shapes, determinism, branch coverage."""

import itertools
import math

import numpy as np
import pytest

from smfsr_jax.data import degradation
from tests.conftest import import_torch


def _random_image(shape, seed=0):
    return np.random.default_rng(seed).random(shape).astype(np.float32)


def _to_torch(torch, img):
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))[None]


def _from_torch(tensor):
    return tensor[0].numpy().transpose(1, 2, 0)


def _assert_parity(ours, reference, bound=1e-5):
    assert ours.shape == reference.shape
    assert np.abs(ours - reference).max() <= bound * np.abs(reference).max()


@pytest.mark.parametrize("mode", degradation.RESIZE_MODES)
def test_resize_matches_torch_interpolate(mode):
    torch = import_torch()
    F = torch.nn.functional
    img = _random_image((37, 53, 3))
    kwargs = {} if mode == "area" else {"align_corners": False}
    for size in [(80, 23), (9, 100), (1, 1), (37, 53), (148, 212)]:
        reference = _from_torch(F.interpolate(_to_torch(torch, img), size=size, mode=mode, **kwargs))
        _assert_parity(degradation.resize(img, size, mode), reference)
    # The first-order resize is torch's scale_factor call: its grid uses 1/scale, not in/out.
    for scale in [0.15, 0.537, 1.0, 1.37, 1.5]:
        reference = _from_torch(F.interpolate(_to_torch(torch, img), scale_factor=scale, mode=mode))
        size = (math.floor(37 * scale), math.floor(53 * scale))
        _assert_parity(degradation.resize(img, size, mode, scale_factor=scale), reference)


def test_upsample_lr_is_torch_bicubic_rounded_to_8_bits():
    torch = import_torch()
    lr = np.round(_random_image((16, 12, 3)) * 255) / 255
    upsampled = torch.nn.functional.interpolate(_to_torch(torch, lr), scale_factor=4, mode="bicubic",
                                                align_corners=False)
    reference = _from_torch(torch.clamp((upsampled * 255).round(), 0, 255) / 255)
    ours = degradation.upsample_lr(lr)
    assert ours.shape == (64, 48, 3) and ours.dtype == np.float32
    np.testing.assert_allclose(ours * 255, np.round(ours * 255), atol=1e-4)
    # A value within float error of a rounding tie may land one level away, nothing more.
    assert np.abs(ours - reference).max() <= 1 / 255 + 1e-6
    assert np.mean(ours != reference) < 1e-3


def test_filter2d_matches_reflect_padded_conv2d():
    torch = import_torch()
    F = torch.nn.functional
    img = _random_image((40, 33, 3))
    config = degradation.default_config()
    kernels = [degradation.gaussian_kernel(7, 1.2, 1.2, 0.0),  # rank one: separable path
               degradation.gaussian_kernel(11, 2.0, 0.7, 0.5),  # direct cv2 path
               degradation.sinc_kernel(2.0, 21)]  # FFT path
    kernels += [degradation.random_blur_kernel(np.random.default_rng(seed), config.first, config)[0]
                for seed in range(6)]
    for kernel in kernels:
        size = kernel.shape[0]
        padded = F.pad(_to_torch(torch, img), [size // 2] * 4, mode="reflect")
        weight = torch.from_numpy(kernel.astype(np.float32)).view(1, 1, size, size).repeat(3, 1, 1, 1)
        reference = _from_torch(F.conv2d(padded, weight, groups=3))
        _assert_parity(degradation.filter2d(img, kernel), reference)


def _diffjpeg_reference(torch, img, quality):
    """BasicSR DiffJPEG (differentiable=False) written out from its definitions, for parity."""
    F = torch.nn.functional
    y_table = torch.tensor(degradation._Y_TABLE)  # standard table, transposed as in BasicSR
    c_table = torch.tensor(degradation._C_TABLE)
    factor = (5000.0 / quality if quality < 50 else 200.0 - 2 * quality) / 100.0
    height, width = img.shape[:2]
    x = F.pad(_to_torch(torch, img), (0, -width % 16, 0, -height % 16))
    rgb_to_ycbcr = torch.tensor([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])
    ycbcr = torch.tensordot((x * 255).permute(0, 2, 3, 1), rgb_to_ycbcr.T, dims=1) + torch.tensor([0.0, 128, 128])
    planes = [ycbcr[..., 0], F.avg_pool2d(ycbcr[None, ..., 1], 2)[0], F.avg_pool2d(ycbcr[None, ..., 2], 2)[0]]
    forward = torch.zeros(8, 8, 8, 8)
    inverse = torch.zeros(8, 8, 8, 8)
    for a, b, u, v in itertools.product(range(8), repeat=4):
        forward[a, b, u, v] = math.cos((2 * a + 1) * u * math.pi / 16) * math.cos((2 * b + 1) * v * math.pi / 16)
        inverse[a, b, u, v] = math.cos((2 * u + 1) * a * math.pi / 16) * math.cos((2 * v + 1) * b * math.pi / 16)
    alpha = torch.tensor([1 / math.sqrt(2)] + [1.0] * 7)
    alpha = torch.outer(alpha, alpha)
    restored = []
    for plane, table in zip(planes, [y_table, c_table, c_table]):
        h, w = plane.shape[1:]
        blocks = plane.view(1, h // 8, 8, w // 8, 8).permute(0, 1, 3, 2, 4).reshape(1, -1, 8, 8)
        coefficients = 0.25 * alpha * torch.tensordot(blocks - 128, forward, dims=2)
        quantised = torch.round(coefficients / (table * factor)) * (table * factor)
        blocks = 0.25 * torch.tensordot(quantised * alpha, inverse, dims=2) + 128
        restored.append(blocks.view(1, h // 8, w // 8, 8, 8).permute(0, 1, 3, 2, 4).reshape(1, h, w))
    upsample = lambda p: p.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)
    ycbcr = torch.stack([restored[0], upsample(restored[1]), upsample(restored[2])], dim=-1)
    ycbcr_to_rgb = torch.tensor([[1.0, 0.0, 1.402], [1, -0.344136, -0.714136], [1, 1.772, 0]])
    rgb = torch.tensordot(ycbcr + torch.tensor([0.0, -128, -128]), ycbcr_to_rgb.T, dims=1)
    return torch.clamp(rgb, 0, 255)[0, :height, :width].numpy() / 255


def test_jpeg_matches_diffjpeg():
    torch = import_torch()
    img = _random_image((37, 45, 3), seed=3)
    img = np.clip(img + np.linspace(0, 0.5, 45, dtype=np.float32)[None, :, None], 0, 1)
    for quality in [30.0, 47.3, 50.0, 77.7, 95.0]:
        ours = degradation.jpeg(img, quality)
        assert ours.dtype == np.float32 and ours.shape == img.shape
        difference = np.abs(ours - _diffjpeg_reference(torch, img, quality))
        # Equal to float error, except that a coefficient within float error of a rounding tie may
        # quantise to the neighbouring level in one implementation (q = 77.7 has one such 8x8 block).
        assert np.quantile(difference, 0.95) <= 1e-6 and difference.max() < 0.02, quality
    assert np.abs(degradation.jpeg(img, 30) - img).mean() > np.abs(degradation.jpeg(img, 95) - img).mean()


def test_kernels_follow_the_basicsr_formulas():
    kernel = degradation.gaussian_kernel(9, 1.5, 0.8, 0.3, "plateau", 1.5)
    ax = np.arange(-4, 5.0)
    xx, yy = np.meshgrid(ax, ax)
    rotation = np.array([[np.cos(0.3), -np.sin(0.3)], [np.sin(0.3), np.cos(0.3)]])
    inverse = np.linalg.inv(rotation @ np.diag([1.5 ** 2, 0.8 ** 2]) @ rotation.T)
    q = inverse[0, 0] * xx ** 2 + (inverse[0, 1] + inverse[1, 0]) * xx * yy + inverse[1, 1] * yy ** 2
    expected = 1 / (q ** 1.5 + 1)
    np.testing.assert_allclose(kernel, expected / expected.sum(), rtol=1e-12)
    sinc = degradation.sinc_kernel(np.pi / 2, 13)
    assert sinc.shape == (13, 13) and np.isclose(sinc.sum(), 1.0)
    np.testing.assert_allclose(sinc, sinc.T)
    config = degradation.default_config()
    for seed in range(20):
        kernel, kind = degradation.random_blur_kernel(np.random.default_rng(seed), config.first, config)
        assert kernel.shape == (21, 21) and np.isclose(kernel.sum(), 1.0), kind


def test_default_config_holds_the_standard_parameters():
    config = degradation.default_config()
    assert config.crop_size == 512 and config.scale == 4 and not config.use_sharpen
    assert tuple(config.first.kernel_prob) == (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    assert tuple(config.first.resize_prob) == (0.2, 0.7, 0.1) and tuple(config.second.resize_prob) == (0.3, 0.4, 0.3)
    assert tuple(config.first.noise_range) == (1.0, 30.0) and tuple(config.second.noise_range) == (1.0, 25.0)
    assert config.second.blur_prob == 0.8 and config.final_sinc_prob == 0.8
    assert tuple(config.kernel_sizes) == tuple(range(7, 22, 2))


@pytest.mark.parametrize("crop_size", [512, 64, 16])
def test_degrade_shapes_and_value_ranges(crop_size):
    config = degradation.default_config()
    config.crop_size = crop_size
    hr = _random_image((crop_size, crop_size, 3))
    out_hr, lr = degradation.degrade(hr, np.random.default_rng([1, 0, 7]), config)
    assert np.array_equal(out_hr, hr)  # no GT sharpening by default
    assert lr.shape == (crop_size // 4, crop_size // 4, 3) and lr.dtype == np.float32
    assert lr.min() >= 0 and lr.max() <= 1
    np.testing.assert_allclose(lr * 255, np.round(lr * 255), atol=1e-4)  # 8-bit levels


def test_degrade_is_a_function_of_the_seed():
    config = degradation.default_config()
    config.crop_size = 64
    hr = _random_image((64, 64, 3))
    first = degradation.degrade(hr, np.random.default_rng([0, 1, 2]), config)[1]
    again = degradation.degrade(hr, np.random.default_rng([0, 1, 2]), config)[1]
    other = degradation.degrade(hr, np.random.default_rng([0, 1, 3]), config)[1]
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def test_usm_sharpening_option():
    config = degradation.default_config()
    config.crop_size = 64
    config.use_sharpen = True
    hr = _random_image((64, 64, 3))
    sharpened, lr = degradation.degrade(hr, np.random.default_rng(0), config)
    assert sharpened.shape == hr.shape and not np.array_equal(sharpened, hr)
    assert sharpened.min() >= 0 and sharpened.max() <= 1 and lr.shape == (16, 16, 3)


def test_every_branch_is_reachable():
    config = degradation.default_config()
    config.crop_size = 32
    hr = _random_image((32, 32, 3))
    seen = {}
    for seed in range(400):
        trace = {}
        degradation.degrade(hr, np.random.default_rng([5, 0, seed]), config, trace)
        for key, value in trace.items():
            seen.setdefault(key, set()).add(value)
    kernels = set(degradation.KERNEL_TYPES) | {"sinc"}
    modes = set(degradation.RESIZE_MODES)
    assert seen == {
        "kernel1": kernels, "kernel2": kernels, "final_sinc": {True, False},
        "resize1": {"up", "down", "keep"}, "mode1": modes, "noise1": {"gaussian", "poisson"}, "gray1": {True, False},
        "blur2": {True, False}, "resize2": {"up", "down", "keep"}, "mode2": modes,
        "noise2": {"gaussian", "poisson"}, "gray2": {True, False},
        "order": {"resize_first", "jpeg_first"}, "mode3": modes}
