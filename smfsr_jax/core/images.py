"""Pixel conventions: images are 8-bit levels on disk and in batches; networks see [-1, 1] (the VAE) or [0, 1]
(metrics, colour correction)."""

import jax.numpy as jnp

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def to_unit(images_u8):
    """uint8 levels -> float32 in [0, 1]."""
    return images_u8.astype(jnp.float32) / jnp.float32(255.0)


def to_signed(images_u8):
    """uint8 levels -> float32 in [-1, 1], the autoencoder's input range."""
    return to_unit(images_u8) * 2.0 - 1.0


def signed_to_unit(x):
    """[-1, 1] (unclamped decoder output) -> float in [0, 1], clipped as a saved image would be."""
    return jnp.clip(x / 2.0 + 0.5, 0.0, 1.0)


def from_signed(x):
    """[-1, 1] (unclamped decoder output) -> uint8, rounded."""
    return jnp.round(signed_to_unit(x) * 255.0).astype(jnp.uint8)


# Y row of BT.601 "MATLAB" YCbCr (pyiqa's rgb2ycbcr): RGB in [0, 1] -> Y in [16, 235] / 255.
LUMA_WEIGHTS = (65.481, 128.553, 24.966)
LUMA_BIAS = 16.0


def luma(images):
    """(N, H, W, 3) float32 RGB in [0, 1] -> (N, H, W) float32 Y in [16/255, 235/255]."""
    y = images @ jnp.asarray(LUMA_WEIGHTS, jnp.float32) + jnp.float32(LUMA_BIAS)
    return y / jnp.float32(255.0)
