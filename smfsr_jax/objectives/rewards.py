"""Rewards of stage 3, as a registry: name -> how to score a batch of super-resolved images.

A reward is `spec.make(network_config) -> fn(params, images, batch) -> (N,)`, higher is better: `images` are
decoder outputs in [−1, 1] (N, H, W, 3), `batch` holds the matching uint8 `hr` (N, H, W, 3) and `lr`
(N, H/4, W/4, 3), `params` the frozen weights of the reward's network (None for analytic rewards, which ignore
the network config too). Every reward is traceable and differentiable, so the direct method back-propagates
through it. The stage loads every network's weights before anything compiles.

    musiq, maniqa, clipiqa   the evaluator's no-reference IQA networks (frozen)
    lpips_hr                 −LPIPS to the HR image
    lr_consistency           −mean |SR box-downscaled to the LR size − LR|, on [0, 1] levels
    hf_energy                mean squared Laplacian of the luma: detail (and noise) energy, analytic
"""

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from smfsr_jax.core import images as images_lib
from smfsr_jax.models import clipiqa, lpips, maniqa, musiq

RewardFn = Callable[[Optional[dict], jax.Array, dict], jax.Array]


def box_downscale(images, factor: int):
    n, h, w, c = images.shape
    return images.reshape(n, h // factor, factor, w // factor, factor, c).mean(axis=(2, 4))


def lr_consistency(params, images, batch) -> jax.Array:
    lr = images_lib.to_unit(batch["lr"])
    factor = images.shape[1] // lr.shape[1]
    return -jnp.abs(box_downscale(images_lib.signed_to_unit(images), factor) - lr).mean(axis=(1, 2, 3))


def hf_energy(params, images, batch) -> jax.Array:
    y = images_lib.luma(images_lib.signed_to_unit(images))
    laplacian = (y[:, 1:-1, 2:] + y[:, 1:-1, :-2] + y[:, 2:, 1:-1] + y[:, :-2, 1:-1] - 4 * y[:, 1:-1, 1:-1])
    return jnp.square(laplacian).mean(axis=(1, 2))


@dataclasses.dataclass(frozen=True)
class RewardSpec:
    name: str
    make: Callable  # network config (None for analytic rewards) -> RewardFn
    network: Optional[str] = None  # the converter whose weights it needs (`python -m smfsr_jax.convert NAME`)


def _analytic(fn: RewardFn) -> Callable:
    return lambda config: fn


def _no_reference(scores: Callable) -> Callable:
    return lambda config: lambda params, images, batch: scores(params, config, images_lib.signed_to_unit(images))


def _lpips_hr(config) -> RewardFn:
    model = lpips.LPIPS(config)
    return lambda params, images, batch: -model.apply({"params": params}, images, images_lib.to_signed(batch["hr"]))


REWARDS = {spec.name: spec for spec in (
    RewardSpec("musiq", _no_reference(musiq.musiq_scores), network="musiq"),
    RewardSpec("maniqa", _no_reference(maniqa.maniqa_scores), network="maniqa"),
    RewardSpec("clipiqa", _no_reference(clipiqa.clipiqa_scores), network="clipiqa"),
    RewardSpec("lpips_hr", _lpips_hr, network="lpips"),
    RewardSpec("lr_consistency", _analytic(lr_consistency)),
    RewardSpec("hf_energy", _analytic(hf_energy)),
)}


def check_names(names) -> None:
    unknown = sorted(set(names) - set(REWARDS))
    if unknown:
        raise ValueError(f"unknown reward(s) {', '.join(unknown)}; known: {', '.join(REWARDS)}")


def combined(reward_fns: dict) -> Callable:
    """(params {name: weights or None}, images, batch) -> {name: (N,) float32 scores} of every reward in
    `reward_fns` ({name: RewardFn})."""
    return lambda params, images, batch: {name: fn(params.get(name), images, batch).astype(jnp.float32)
                                          for name, fn in reward_fns.items()}
