"""Reconstruction loss of stage 2 (SMFSR Eq. 19): MSE + LPIPS on decoded images in [-1, 1], unclamped."""

from typing import Callable

import jax.numpy as jnp


def reconstruction_loss(x_hat, x, lpips_fn: Callable, lpips_weight: float = 1.0):
    """(loss, metrics); `lpips_fn(a, b) -> (B,)` distances (LPIPS-VGG v0.1 in the paper's setting)."""
    mse = jnp.mean(jnp.square(x_hat - x))
    lpips = jnp.mean(lpips_fn(x_hat, x))
    return mse + lpips_weight * lpips, {"rec_mse": mse, "rec_lpips": lpips}
