"""Shared entry-point plumbing of the no-reference metric networks (MUSIQ, MANIQA, CLIPIQA)."""

import os
from typing import Callable, Sequence

import jax
import numpy as np

from smfsr_jax.convert.common import CheckpointError, is_converted, load_converted
from smfsr_jax.evaluation.io import to_unit_float


def score_by_size(score_batch: Callable, images, batch_size: int = 1) -> np.ndarray:
    """Per-image scores of an NHWC batch or a list of HWC images, grouped by size.

    `score_batch` maps float32 (B, H, W, 3) in [0, 1] to (B,) scores (jit it: one trace per size); it is
    traced with fp32 matmuls and convolutions ("highest"), as the torch references compute.
    """
    images = [to_unit_float(im) for im in (images if isinstance(images, Sequence) else np.asarray(images))]
    for i, image in enumerate(images):
        if image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"image {i}: expected H x W x 3 (RGB, NHWC), got shape {image.shape}")
    scores = np.zeros(len(images), np.float64)
    by_size = {}
    for i, image in enumerate(images):
        by_size.setdefault(image.shape, []).append(i)
    for indices in by_size.values():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start:start + batch_size]
            with jax.default_matmul_precision("highest"):
                scores[chunk] = np.asarray(score_batch(np.stack([images[i] for i in chunk])))
    return scores


def load_metric(path, converter: str) -> tuple[dict, dict]:
    """(config dict, params) of a directory written by smfsr_jax.convert.<converter>.convert."""
    path = os.fspath(path)
    if not is_converted(path):
        raise CheckpointError(f"{path}: not a converted {converter} directory; convert the published weights "
                              f"first with smfsr_jax.convert.{converter}.convert(src, dst)")
    config, meta, params = load_converted(path)
    if meta.get("converter") != converter:
        raise CheckpointError(f"{path}: holds {meta.get('converter')!r} weights, not {converter!r}")
    return config, params
