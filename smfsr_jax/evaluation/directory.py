"""Directory mode: score the SR images of a directory, against references of the same names for the
full-reference metrics. The pairs' image sizes are checked from the file headers before any scoring: a
pair of different sizes stops the run (every such pair named), or is skipped with skip_mismatched.
Unreadable and skipped images are named with the reason; means are over the evaluated images. Either directory
may be in a bucket (gs://...)."""

import os
import sys
import time

import numpy as np
from PIL import Image
from tqdm import tqdm

from smfsr_jax.core import errors, files
from smfsr_jax.data.images import EXIF_ORIENTATION
from smfsr_jax.evaluation.io import UnreadableImageError, list_images, read_rgb8
from smfsr_jax.evaluation.metrics import REGISTRY, Metric
from smfsr_jax.evaluation.results import write_results

MAX_NAMES_SHOWN = 20


class PairingError(errors.UserError, ValueError):
    """SR and reference directories that do not pair up: differing file names or image sizes."""


def _names_list(names) -> str:
    shown = ", ".join(names[:MAX_NAMES_SHOWN])
    return shown + (f" ... ({len(names)} in all)" if len(names) > MAX_NAMES_SHOWN else "")


def pair_names(sr_dir: str, hr_dir: str | None, need_reference: bool) -> list[str]:
    """The SR file names to score; with references, both directories must hold the same names."""
    sr_names = list_images(sr_dir)
    if not need_reference:
        return sr_names
    if hr_dir is None:
        raise PairingError("full-reference metrics need --hr_dir")
    hr_names = list_images(hr_dir)
    if sr_names != hr_names:
        only_sr = sorted(set(sr_names) - set(hr_names))
        only_hr = sorted(set(hr_names) - set(sr_names))
        raise PairingError(f"SR and reference file names differ: only in {sr_dir}: {_names_list(only_sr) or '-'}; "
                           f"only in {hr_dir}: {_names_list(only_hr) or '-'}")
    return sr_names


def image_size(path: str) -> tuple[int, int] | None:
    """(width, height) of an image as read_rgb8 decodes it, from the header alone; None when PIL cannot
    parse it (read_rgb8 then decides whether it is readable)."""
    try:
        with files.path(path).open("rb") as f, Image.open(f) as image:
            width, height = image.size
            exif = Image.Exif()
            # info["exif"] is parsed at open; image.getexif() would decode a PNG that has none.
            exif.load(image.info.get("exif", b""))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):  # files PIL cannot or will not parse
        return None
    # cv2 applies the EXIF orientation: 5..8 are the rotations by 90 degrees.
    return (height, width) if exif.get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8) else (width, height)


def pair_images(sr_dir: str, hr_dir: str | None, need_reference: bool,
                skip_mismatched: bool = False) -> tuple[list[str], dict[str, str]]:
    """(names to score, {name: reason} of the pairs set aside): `pair_names`, then, with references, every
    pair's sizes from the headers. Pairs of different sizes raise one PairingError naming all of them, or,
    with skip_mismatched, are set aside."""
    names = pair_names(sr_dir, hr_dir, need_reference)
    if not need_reference:
        return names, {}
    mismatched = {}  # name: "SR WxH, reference WxH"
    for name in names:
        sr_size, hr_size = image_size(os.path.join(sr_dir, name)), image_size(os.path.join(hr_dir, name))
        if sr_size and hr_size and sr_size != hr_size:
            mismatched[name] = f"SR {sr_size[0]}x{sr_size[1]}, reference {hr_size[0]}x{hr_size[1]}"
    if mismatched and not skip_mismatched:
        raise PairingError(f"{len(mismatched)} SR image(s) in {sr_dir} differ in size from their reference in "
                           f"{hr_dir}: " + "; ".join(f"{name} ({sizes})" for name, sizes in mismatched.items())
                           + "; full-reference metrics need equal sizes (--skip_mismatched scores the others)")
    return ([name for name in names if name not in mismatched],
            {name: f"{sizes}: sizes differ" for name, sizes in mismatched.items()})


def _read_pair(sr_dir: str, hr_dir: str | None, name: str):
    sr = read_rgb8(os.path.join(sr_dir, name))
    hr = None if hr_dir is None else read_rgb8(os.path.join(hr_dir, name))
    if hr is not None and hr.shape != sr.shape:  # a header pair_images could not read or that misled it
        raise PairingError(f"{name}: SR image is {sr.shape[1]}x{sr.shape[0]} but the reference is "
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
                       show_progress: bool = True, names=None, skipped=None) -> dict:
    """Score the images of sr_dir (against hr_dir for full-reference metrics); see the module docstring for the
    returned structure. `names` and `skipped` {name: reason}: the files to score and those set aside, as
    `pair_images` returns them (default: its names, pairs of different sizes raising)."""
    scores = Scores(metrics)
    if names is None:
        names, skipped = pair_images(sr_dir, hr_dir, scores.need_reference)
    for name, reason in (skipped or {}).items():
        scores.skip(name, reason)
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


def score_and_write(sr_dir: str, hr_dir: str | None, metrics: dict[str, Metric], batch_size: int, names, skipped,
                    out: str):
    """Directory mode end to end: score, print the means (before writing, so a failed write still shows them),
    write `out` and its siblings (results.write_results)."""
    results = evaluate_directory(sr_dir, hr_dir, metrics, batch_size, names=names, skipped=skipped)
    means = "; ".join(f"{REGISTRY[m].log_name}: {v:.4f}" for m, v in results["mean"].items())
    print(f"{results['count']} images, {len(results['skipped'])} skipped"
          + (f" ({', '.join(results['skipped'])})" if results["skipped"] else "") + f" | {means}")
    print("wrote " + ", ".join(write_results(results, out)))
