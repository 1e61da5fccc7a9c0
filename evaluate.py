r"""Score SR images with the protocol metrics (design/evaluation.md).

Directory mode:
  python evaluate.py --sr_dir results/drealsr --hr_dir ../shared/data/drealsr/test_HR \
      --metrics psnr,ssim,lpips,clipiqa,musiq,maniqa --weights_dir weights --out results/drealsr.json

Images are paired by file name (Python sorted() order) and read as 8-bit RGB with alpha dropped.
Full-reference metrics (psnr, ssim, lpips) need --hr_dir and identical file names on both sides; the
no-reference ones (clipiqa, musiq, maniqa) read only --sr_dir. Unreadable images are skipped, counted and
named; means are over the evaluated images. Metric weights: --<metric>_weights PATH, or --weights_dir DIR
holding DIR/<metric> (see smfsr_jax/evaluation/metrics.py).

Outputs, beside --out (x.json):
  x.json  {"per_image": {file: {metric: score}}, "mean": {metric: score}, "count": evaluated images,
           "skipped": {file: reason}, "runtime_s": {file: seconds}, "metrics": [...], "sr_dir", "hr_dir"}
  x.csv   one row per image: image, then one column per metric
  x.md    mean row and per-image rows (4 decimals), with the better direction per metric
  x.log   OSEDiff's per-image log format (evaluation.md §10)
On DRealSR's OSEDiff outputs, psnr,ssim give means 27.9243 / 0.7835, the published log's values.
"""

import csv
import json
import os
import sys
import time

import numpy as np
from absl import app, flags

from smfsr_jax.evaluation.io import UnreadableImageError, list_images, read_rgb8
from smfsr_jax.evaluation.metrics import REGISTRY, Metric, build_metrics
from smfsr_jax.evaluation.osediff_log import evaluation_log, format_log

DEFAULT_METRICS = ("psnr", "ssim", "lpips", "clipiqa", "musiq", "maniqa")
_MAX_NAMES_SHOWN = 20


def _define_flags():
    flags.DEFINE_string("sr_dir", None, "directory of SR images", required=True)
    flags.DEFINE_string("hr_dir", None, "directory of reference images (full-reference metrics)")
    flags.DEFINE_list("metrics", list(DEFAULT_METRICS), f"comma-separated, from {', '.join(REGISTRY)}")
    flags.DEFINE_string("out", None, "results JSON path; .csv, .md and .log are written beside it", required=True)
    flags.DEFINE_string("weights_dir", None, "directory holding one weights entry per metric, under its name")
    for spec in REGISTRY.values():
        if spec.needs_weights:
            flags.DEFINE_string(spec.weights_flag, None, f"{spec.name} weights: {spec.weights_help}")
    flags.DEFINE_integer("batch_size", 8, "images scored per call (same-size images are batched)")


def _names_list(names) -> str:
    shown = ", ".join(names[:_MAX_NAMES_SHOWN])
    return shown + (f" ... ({len(names)} in all)" if len(names) > _MAX_NAMES_SHOWN else "")


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


def evaluate_directory(sr_dir: str, hr_dir: str | None, metrics: dict[str, Metric], batch_size: int = 8,
                       show_progress: bool = True) -> dict:
    """Score every image of sr_dir (against hr_dir for full-reference metrics); see the module docstring for
    the returned structure."""
    need_reference = any(m.full_reference for m in metrics.values())
    names = pair_names(sr_dir, hr_dir, need_reference)
    reference_dir = hr_dir if need_reference else None
    per_image, runtimes, skipped = {}, {}, {}
    chunks = range(0, len(names), batch_size)
    if show_progress:
        from tqdm import tqdm
        chunks = tqdm(chunks, desc="evaluate", unit="batch", file=sys.stderr)
    for start in chunks:
        by_size = {}
        for name in names[start:start + batch_size]:
            try:
                sr, hr = _read_pair(sr_dir, reference_dir, name)
            except UnreadableImageError as e:
                skipped[name] = str(e)
                continue
            by_size.setdefault(sr.shape, []).append((name, sr, hr))
        for group in by_size.values():
            group_names = [name for name, _, _ in group]
            sr = np.stack([image for _, image, _ in group])
            hr = np.stack([image for _, _, image in group]) if need_reference else None
            began = time.perf_counter()
            scores = {metric_name: metric(sr, hr) for metric_name, metric in metrics.items()}
            seconds = (time.perf_counter() - began) / len(group)
            for i, name in enumerate(group_names):
                per_image[name] = {metric_name: float(values[i]) for metric_name, values in scores.items()}
                runtimes[name] = seconds
    per_image = dict(sorted(per_image.items()))
    mean = {m: float(np.mean([scores[m] for scores in per_image.values()])) for m in metrics} if per_image else {}
    return {"per_image": per_image, "mean": mean, "count": len(per_image), "skipped": dict(sorted(skipped.items())),
            "runtime_s": dict(sorted(runtimes.items())), "metrics": list(metrics), "sr_dir": sr_dir,
            "hr_dir": reference_dir}


def _markdown(results: dict) -> str:
    columns = [f"{REGISTRY[m].log_name} {'↓' if REGISTRY[m].lower_better else '↑'}" for m in results["metrics"]]
    header = ["| image | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]

    def row(label, scores):
        return f"| {label} | " + " | ".join(f"{scores[m]:.4f}" for m in results["metrics"]) + " |"

    lines = [f"Scores of `{results['sr_dir']}`" + (f" against `{results['hr_dir']}`" if results["hr_dir"] else "")
             + f": {results['count']} images, {len(results['skipped'])} skipped.", ""]
    if results["mean"]:
        lines += header + [row(f"**mean** ({results['count']})", results["mean"]), ""]
        lines += header + [row(name, scores) for name, scores in results["per_image"].items()]
    if results["skipped"]:
        lines += ["", "Skipped:"] + [f"- {name}: {reason}" for name, reason in results["skipped"].items()]
    return "\n".join(lines) + "\n"


def write_results(results: dict, out_path: str) -> list[str]:
    """results.json plus .csv, .md and .log beside it; returns the paths written."""
    stem = os.path.splitext(out_path)[0]
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    paths = [out_path, f"{stem}.csv", f"{stem}.md", f"{stem}.log"]
    with open(paths[0], "w") as f:
        json.dump(results, f, indent=2)
        f.write("\n")
    with open(paths[1], "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image"] + results["metrics"])
        for name, scores in results["per_image"].items():
            writer.writerow([name] + [repr(scores[m]) for m in results["metrics"]])
    with open(paths[2], "w") as f:
        f.write(_markdown(results))
    log_names = {m: REGISTRY[m].log_name for m in results["metrics"]}
    log = evaluation_log(
        results["sr_dir"], results["hr_dir"],
        {name: {log_names[m]: v for m, v in scores.items()} for name, scores in results["per_image"].items()},
        {log_names[m]: v for m, v in results["mean"].items()}, results["runtime_s"], results["skipped"])
    with open(paths[3], "w") as f:
        f.write(format_log(log))
    return paths


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    FLAGS = flags.FLAGS
    weights_paths = {name: getattr(FLAGS, spec.weights_flag) for name, spec in REGISTRY.items()
                     if spec.needs_weights}
    try:
        metrics = build_metrics(FLAGS.metrics, weights_paths, FLAGS.weights_dir)
        results = evaluate_directory(FLAGS.sr_dir, FLAGS.hr_dir, metrics, FLAGS.batch_size)
    except (ValueError, FileNotFoundError) as e:  # bad flags, missing weights, mismatched names
        sys.exit(f"evaluate.py: {e}")
    paths = write_results(results, FLAGS.out)
    means = "; ".join(f"{REGISTRY[m].log_name}: {v:.4f}" for m, v in results["mean"].items())
    print(f"{results['count']} images, {len(results['skipped'])} skipped"
          + (f" ({', '.join(results['skipped'])})" if results["skipped"] else "") + f" | {means}")
    print("wrote " + ", ".join(paths))


if __name__ == "__main__":
    _define_flags()
    app.run(main)
