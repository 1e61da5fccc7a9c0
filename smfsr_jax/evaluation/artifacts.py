"""Image statistics for the tiny experiments, where no perceptual metric network has weights.

Token-grid artifacts: how much stronger the image changes across the borders of the network's tokens
than inside them.

A transformer predicts each token's pixel block from that token's features; while it is poorly trained the
blocks disagree at their borders and the output is a mosaic. `block_ratio` is the mean |horizontal luma
gradient| between the last column of one block and the first of the next, over the mean inside blocks:
about 1 for photographs (1.0 for the bundled HR crops), 1.14 for bicubic x4 at 8-pixel blocks, 2 for a
visible mosaic.

Detail: `detail_ratio` is the mean |Laplacian| of the luma over that of the references; PSNR rewards the
blurry conditional mean (a ratio well below 1), while samples of the right distribution carry the
references' fine detail (about 1).
"""

import numpy as np

from smfsr_jax.evaluation.io import to_unit_float
from smfsr_jax.core.images import luma


def block_ratio(images, block: int) -> float:
    """Border-to-interior gradient ratio of (N, H, W, 3) uint8 or [0, 1] images on a `block`-pixel grid."""
    if block < 2:
        raise ValueError(f"block must be at least 2 pixels, got {block}")
    y = np.asarray(luma(to_unit_float(np.asarray(images))), np.float64)
    grad = np.abs(np.diff(y, axis=2))  # grad[..., x] is between columns x and x + 1
    across = (np.arange(grad.shape[2]) + 1) % block == 0
    return float(grad[..., across].mean() / max(grad[..., ~across].mean(), 1e-12))


def _laplacian_energy(images) -> np.ndarray:
    y = np.asarray(luma(to_unit_float(np.asarray(images))), np.float64)
    lap = 4 * y[:, 1:-1, 1:-1] - y[:, :-2, 1:-1] - y[:, 2:, 1:-1] - y[:, 1:-1, :-2] - y[:, 1:-1, 2:]
    return np.abs(lap).mean(axis=(1, 2))


def detail_ratio(images, references) -> float:
    """Mean |Laplacian| of (N, H, W, 3) images over that of their references (same shape)."""
    return float(_laplacian_energy(images).mean() / max(_laplacian_energy(references).mean(), 1e-12))
