"""Tolerances and helpers shared by the MUSIQ, MANIQA and CLIPIQA parity tests."""

import numpy as np

# A score is one scalar at the end of a deep fp32 chain, where summation order alone moves it by up to
# ~6e-6 relative (full-size MUSIQ); activations are compared against their largest entry.
SCORE_REL = 5e-5


def assert_close(actual, expected, rel=1e-5):
    expected = np.asarray(expected)
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=0, atol=rel * np.abs(expected).max())


def unit(image):
    """A uint8 HWC image as a (1, H, W, C) float batch in [0, 1]."""
    return image[None].astype(np.float32) / 255
