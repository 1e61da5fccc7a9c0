"""Directory mode: score the SR images of a directory, against references of the same names for the
full-reference metrics. Unreadable images are skipped and named; means are over the evaluated images."""

import os
import sys
import time

import numpy as np
from tqdm import tqdm

from smfsr_jax.evaluation.io import UnreadableImageError, list_images, read_rgb8
from smfsr_jax.evaluation.metrics import Metric

MAX_NAMES_SHOWN = 20


def _names_list(names) -> str:
    shown = ", ".join(names[:MAX_NAMES_SHOWN])
    return shown + (f" ... ({len(names)} in all)" if len(names) > MAX_NAMES_SHOWN else "")


def pair_names(sr_dir: str, hr_dir: str | None, need_reference: bool) -> list[str]:
    """The SR file names to score; with references, both directories must hold the same names."""
    sr_names = list_images(sr_dir)
    if not need_reference:
        return sr_names
    if hr_dir is None:
        raise ValueError("full-reference metrics need --hr_dir")
    hr_names = list_images(hr_dir)
    if sr_names != hr_names:
        only_sr = sorted(set(sr_names) - set(hr_names))
        only_hr = sorted(set(hr_names) - set(sr_names))
        raise ValueError(f"SR and reference file names differ: only in {sr_dir}: {_names_list(only_sr) or '-'}; "
                         f"only in {hr_dir}: {_names_list(only_hr) or '-'}")
    return sr_names


def _read_pair(sr_dir: str, hr_dir: str | None, name: str):
    sr = read_rgb8(os.path.join(sr_dir, name))
    hr = None if hr_dir is None else read_rgb8(os.path.join(hr_dir, name))
    if hr is not None and hr.shape != sr.shape:
        raise ValueError(f"{name}: SR image is {sr.shape[1]}x{sr.shape[0]} but the reference is "
                         f"{hr.shape[1]}x{hr.shape[0]}; full-reference metrics need equal sizes")
    return sr, hr


class Scores:
    """Per-image scores of images added in batches of any sizes; `results()` is directory mode's structure."""

    def __init__(self, metrics: dict[str, Metric]):
        self.metrics = metrics
        self.need_reference = any(m.full_reference for m in metrics.values())
        self.per_image, self.runtimes, self.skipped = {}, {}, {}

    def add(self, names, sr_images, hr_images=None):
        """Score (name, SR, reference) triples; same-size images are scored in one call per metric."""
        by_size = {}
        for i, (name, sr) in enumerate(zip(names, sr_images)):
            by_size.setdefault(sr.shape, []).append((name, sr, None if hr_images is None else hr_images[i]))
        for group in by_size.values():
            sr = np.stack([image for _, image, _ in group])
            hr = np.stack([image for _, _, image in group]) if self.need_reference else None
            began = time.perf_counter()
            scores = {metric_name: metric(sr, hr) for metric_name, metric in self.metrics.items()}
            seconds = (time.perf_counter() - began) / len(group)
            for i, (name, _, _) in enumerate(group):
                self.per_image[name] = {metric_name: float(values[i]) for metric_name, values in scores.items()}
                self.runtimes[name] = seconds

    def skip(self, name: str, reason: str):
        self.skipped[name] = reason

    def results(self, sr_dir: str, hr_dir: str | None, **fields) -> dict:
        per_image = dict(sorted(self.per_image.items()))
        mean = ({m: float(np.mean([scores[m] for scores in per_image.values()])) for m in self.metrics}
                if per_image else {})
        return {"per_image": per_image, "mean": mean, "count": len(per_image),
                "skipped": dict(sorted(self.skipped.items())), "runtime_s": dict(sorted(self.runtimes.items())),
                "metrics": list(self.metrics), "sr_dir": sr_dir, "hr_dir": hr_dir if self.need_reference else None,
                **fields}


def evaluate_directory(sr_dir: str, hr_dir: str | None, metrics: dict[str, Metric], batch_size: int = 8,
                       show_progress: bool = True, names=None) -> dict:
    """Score every image of sr_dir, or only `names` (against hr_dir for full-reference metrics); see the module
    docstring for the returned structure."""
    scores = Scores(metrics)
    if names is None:
        names = pair_names(sr_dir, hr_dir, scores.need_reference)
    reference_dir = hr_dir if scores.need_reference else None
    chunks = range(0, len(names), batch_size)
    if show_progress:
        chunks = tqdm(chunks, desc="evaluate", unit="batch", file=sys.stderr)
    for start in chunks:
        readable, sr_images, hr_images = [], [], []
        for name in names[start:start + batch_size]:
            try:
                sr, hr = _read_pair(sr_dir, reference_dir, name)
            except UnreadableImageError as e:
                scores.skip(name, str(e))
                continue
            readable.append(name)
            sr_images.append(sr)
            hr_images.append(hr)
        scores.add(readable, sr_images, hr_images)
    return scores.results(sr_dir, reference_dir)
