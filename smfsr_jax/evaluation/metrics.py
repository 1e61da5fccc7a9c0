"""Metric registry: name -> scorer over batches of images, with its direction and the weights it needs.

Every metric is built by a loader `function(weights_path or None) -> scorer`, named as 'module:function'
so that a metric's module (and its network) is imported only when asked for. Scorers take NHWC batches of
one size, uint8 or float in [0, 1]: full-reference ones `(sr, hr)`, no-reference ones `(sr)`, and return
(N,) scores. MUSIQ, MANIQA and CLIPIQA plug in through smfsr_jax.evaluation.scoring's
`load_<name>(converted_dir)`.

Weights: `--<name>_weights PATH`, or `--weights_dir DIR` holding one entry per metric under its name
(DIR/lpips, DIR/musiq, ...). Either may be in a bucket (gs://...): the loaders read it there (staging what they
can read only from local files).
"""

import dataclasses
import importlib
import os
from typing import Callable, Mapping

import jax
import numpy as np

from smfsr_jax.convert.lpips import load_lpips_from
from smfsr_jax.core import errors, files
from smfsr_jax.evaluation.io import to_unit_float
from smfsr_jax.evaluation.psnr_ssim import psnr, ssim
from smfsr_jax.models.lpips import LPIPS


class MissingWeightsError(errors.UserError, ValueError):
    """A metric that needs weights was asked for without them; the message names the flag."""


@dataclasses.dataclass(frozen=True)
class MetricSpec:
    name: str  # registry and command-line name
    log_name: str  # column name in OSEDiff logs
    full_reference: bool
    lower_better: bool
    loader: str  # 'module:function', function(weights_path or None) -> scorer
    weights_help: str = ""  # what the weights flag takes; empty when no weights are needed

    @property
    def needs_weights(self) -> bool:
        return bool(self.weights_help)

    @property
    def weights_flag(self) -> str:
        return f"{self.name}_weights"


_CONVERTED = "a directory written by `python -m smfsr_jax.convert {}`"
REGISTRY = {spec.name: spec for spec in (
    MetricSpec("psnr", "PSNR", full_reference=True, lower_better=False,
               loader="smfsr_jax.evaluation.metrics:load_psnr"),
    MetricSpec("ssim", "SSIM", full_reference=True, lower_better=False,
               loader="smfsr_jax.evaluation.metrics:load_ssim"),
    MetricSpec("lpips", "LPIPS", full_reference=True, lower_better=True,
               loader="smfsr_jax.evaluation.metrics:load_lpips_alex",
               weights_help="a converted LPIPS-Alex directory, a directory holding alexnet-owt-7be5be79.pth and "
                            "alex.pth (or pyiqa's LPIPS_v0.1_alex-*.pth), or a pyiqa LPIPS file with the trunk"),
    MetricSpec("clipiqa", "CLIPIQA", full_reference=False, lower_better=False,
               loader="smfsr_jax.evaluation.scoring:load_clipiqa", weights_help=_CONVERTED.format("clipiqa")),
    MetricSpec("musiq", "MUSIQ", full_reference=False, lower_better=False,
               loader="smfsr_jax.evaluation.scoring:load_musiq", weights_help=_CONVERTED.format("musiq")),
    MetricSpec("maniqa", "MANIQA", full_reference=False, lower_better=False,
               loader="smfsr_jax.evaluation.scoring:load_maniqa", weights_help=_CONVERTED.format("maniqa")),
)}


@dataclasses.dataclass(frozen=True)
class Metric:
    spec: MetricSpec
    scorer: Callable

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def full_reference(self) -> bool:
        return self.spec.full_reference

    @property
    def lower_better(self) -> bool:
        return self.spec.lower_better

    def __call__(self, sr, hr=None) -> np.ndarray:
        if self.full_reference:
            if hr is None:
                raise ValueError(f"{self.name} is a full-reference metric: it needs the reference images")
            return np.asarray(self.scorer(sr, hr), np.float64).reshape(-1)
        return np.asarray(self.scorer(sr), np.float64).reshape(-1)


def load_psnr(weights_path=None) -> Callable:
    return psnr


def load_ssim(weights_path=None) -> Callable:
    return ssim


def load_lpips_alex(weights_path) -> Callable:
    """LPIPS-Alex v0.1 on [0, 1] images (mapped to [-1, 1]), as pyiqa `lpips`."""
    config, params = load_lpips_from(weights_path, "alex")
    model = LPIPS(config)
    distance = jax.jit(lambda p, sr, hr: model.apply({"params": p}, 2 * sr - 1, 2 * hr - 1))
    return lambda sr, hr: np.asarray(distance(params, to_unit_float(sr), to_unit_float(hr)))


def weights_path_for(spec: MetricSpec, weights_paths: Mapping[str, str], weights_dir=None):
    """The weights of one metric: its own flag first, then weights_dir/<name>; None when it needs none or
    none was given."""
    if not spec.needs_weights:
        return None
    if weights_paths.get(spec.name):
        return weights_paths[spec.name]
    if weights_dir and files.exists(os.path.join(weights_dir, spec.name)):
        return os.path.join(weights_dir, spec.name)
    return None


def _missing_weights(specs: list[MetricSpec], weights_dir=None) -> MissingWeightsError:
    """One error naming every metric without weights, with what to pass for each."""
    hints = [f"pass --{spec.weights_flag} with {spec.weights_help}, or --weights_dir DIR holding DIR/{spec.name}"
             + (f" (no {os.path.join(weights_dir, spec.name)} either)" if weights_dir else "") for spec in specs]
    if len(specs) == 1:
        return MissingWeightsError(f"metric {specs[0].name} needs weights: {hints[0]}")
    return MissingWeightsError(f"metrics {', '.join(spec.name for spec in specs)} need weights: "
                               + "; ".join(f"{spec.name}: {hint}" for spec, hint in zip(specs, hints)))


def build_metrics(names, weights_paths: Mapping[str, str] | None = None, weights_dir=None) -> dict[str, Metric]:
    """{name: Metric} for the requested names, in registry (log) order. Weights are resolved for all metrics
    before any is loaded, so that every missing one is reported at once, before minutes of loading."""
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        raise ValueError(f"unknown metric(s) {', '.join(unknown)}; known: {', '.join(REGISTRY)}")
    specs = [spec for name, spec in REGISTRY.items() if name in set(names)]
    paths = {spec.name: weights_path_for(spec, weights_paths or {}, weights_dir) for spec in specs}
    missing = [spec for spec in specs if spec.needs_weights and paths[spec.name] is None]
    if missing:
        raise _missing_weights(missing, weights_dir)
    metrics = {}
    for spec in specs:
        module_name, function_name = spec.loader.split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            raise ValueError(f"metric {spec.name} is not available in this installation ({e})") from None
        metrics[spec.name] = Metric(spec, getattr(module, function_name)(paths[spec.name]))
    return metrics
