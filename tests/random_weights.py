"""Fully random MM-DiT weights for tests whose outputs must depend on every parameter."""

import jax
import numpy as np

from smfsr_jax.models import mmdit


def random_mmdit_params(cfg: mmdit.MMDiTConfig, seed: int = 0, scale: float = 0.2):
    """Every leaf ~ scale * N(0, 1) (no zero control or modulation weights), drawn on the host into the tree
    of eval_shape: an init plus per-leaf jax draws compile one program per shape (~25 s on 2 cores)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: (scale * rng.standard_normal(x.shape)).astype(x.dtype),
                        mmdit.abstract_params(cfg))
