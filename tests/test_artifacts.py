"""Block and detail ratios on images whose answer is known."""

import numpy as np
import pytest
from skimage import data

from smfsr_jax.evaluation.artifacts import block_ratio, detail_ratio


def photo():
    return data.astronaut()[:256, :256]


def test_a_photograph_has_no_token_grid_and_a_mosaic_has_one():
    image = photo()[None]
    assert abs(block_ratio(image, 4) - 1.0) < 0.1
    # Nearest-neighbour x4 of a /4 image: constant blocks, every change sits on the 4-pixel grid.
    mosaic = np.repeat(np.repeat(image[:, ::4, ::4], 4, axis=1), 4, axis=2)
    assert block_ratio(mosaic, 4) > 10
    with pytest.raises(ValueError, match="at least 2"):
        block_ratio(image, 1)


def test_blur_loses_detail():
    image = photo().astype(np.float32)
    blurred = (image + np.roll(image, 1, 0) + np.roll(image, 1, 1) + np.roll(image, (1, 1), (0, 1))) / 4
    assert detail_ratio(image[None].astype(np.uint8), image[None].astype(np.uint8)) == pytest.approx(1.0)
    assert detail_ratio(blurred[None].round().astype(np.uint8), image[None].astype(np.uint8)) < 0.8
