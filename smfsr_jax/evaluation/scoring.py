"""The no-reference metrics MUSIQ, MANIQA and CLIPIQA as scorers: converted weights -> images -> scores.

The networks live in smfsr_jax.models.{musiq,maniqa,clipiqa}; this module loads their converted weights
and feeds them images of any size. Scorers take an NHWC batch or a list of HWC images of any sizes,
uint8 or float in [0, 1], and return per-image scores (np.ndarray).
"""

from typing import Callable, Sequence

import jax
import numpy as np

from smfsr_jax.convert.converted_dir import load_converted_of
from smfsr_jax.evaluation.io import to_unit_float
from smfsr_jax.models import clipiqa, maniqa, musiq


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


def load_scorer(path, converter: str, config_from_dict: Callable, scores: Callable, batch_size: int = 1) -> Callable:
    """Scorer of a converted directory: `scores(params, config, images)` jitted once per image size, with
    the params as an argument (not a constant) so that compiles stay fast."""
    config_dict, params = load_converted_of(path, converter)
    config = config_from_dict(config_dict)
    score_batch = jax.jit(scores, static_argnums=1)
    return lambda images: score_by_size(lambda x: score_batch(params, config, x), images, batch_size)


def load_musiq(path, batch_size: int = 1) -> Callable:
    """MUSIQ scorer of a directory written by smfsr_jax.convert.musiq."""
    return load_scorer(path, "musiq", musiq.config_from_dict, musiq.musiq_scores, batch_size)


def load_maniqa(path, batch_size: int = 1) -> Callable:
    """MANIQA scorer of a directory written by smfsr_jax.convert.maniqa."""
    return load_scorer(path, "maniqa", maniqa.config_from_dict, maniqa.maniqa_scores, batch_size)


def load_clipiqa(path, batch_size: int = 1) -> Callable:
    """CLIPIQA scorer of a directory written by smfsr_jax.convert.clipiqa."""
    return load_scorer(path, "clipiqa", clipiqa.config_from_dict, clipiqa.clipiqa_scores, batch_size)
