"""Writing one set of scores: x.json plus x.csv, x.md and OSEDiff's per-image log x.log beside it, locally or in a
bucket (gs://...); checking before a run that its outputs can be written, and reporting a write that fails
part-way.

  x.json  {"per_image": {file: {metric: score}}, "mean": {metric: score}, "count": evaluated images,
           "skipped": {file: reason}, "runtime_s": {file: seconds}, "metrics": [...], "sr_dir", "hr_dir"}
  x.csv   one row per image: image, then one column per metric
  x.md    mean row and per-image rows (4 decimals), with the better direction per metric
  x.log   OSEDiff's per-image log format (docs/design.md#osediff-log)
"""

import contextlib
import csv
import io
import json
import os

from smfsr_jax.core import errors, files
from smfsr_jax.evaluation.metrics import REGISTRY
from smfsr_jax.evaluation.osediff_log import evaluation_log, format_log


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


def result_paths(out_path: str) -> list[str]:
    """x.json, x.csv, x.md and x.log for out_path x.json."""
    stem = os.path.splitext(out_path)[0]
    return [out_path, f"{stem}.csv", f"{stem}.md", f"{stem}.log"]


def _directory(out_path: str) -> str:
    """The folder of out_path: its bucket prefix, or the absolute local folder."""
    return os.path.dirname(out_path if files.is_remote(out_path) else os.path.abspath(out_path))


def check_results_path(out_path: str):
    """`check_writable` for the directory of write_results' files, none of which may be a directory."""
    files.check_writable(_directory(out_path))
    for path in result_paths(out_path):
        if files.is_dir(path):
            raise errors.UserError(f"{path} is a directory; --out takes the path of the results JSON file")


@contextlib.contextmanager
def writing(path: str, kept: str = ""):
    """An OSError while writing under `path` becomes a RunFailure naming the file (a failed rename's target),
    the OS reason and `kept` (what the run has saved)."""
    try:
        yield
    except OSError as e:
        raise errors.RunFailure(f"{e.filename2 or e.filename or path}: could not write it: {e.strerror or e}"
                                + (f"; {kept}" if kept else "")) from e


def write_text(path: str, text: str):
    """One results file: a single upload in a bucket; a local file is written in place, so that --out may name
    a device or a pipe (/dev/stdout)."""
    if files.is_remote(path):
        files.write_text(path, text)
        return
    with open(path, "w", newline="") as f:  # newline="": as is (the csv rows end in \r\n, as csv writes them)
        f.write(text)


def _csv(results: dict) -> str:
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["image"] + results["metrics"])
    for name, scores in results["per_image"].items():
        writer.writerow([name] + [repr(scores[m]) for m in results["metrics"]])
    return text.getvalue()


def _log(results: dict) -> str:
    log_names = {m: REGISTRY[m].log_name for m in results["metrics"]}
    return format_log(evaluation_log(
        results["sr_dir"], results["hr_dir"],
        {name: {log_names[m]: v for m, v in scores.items()} for name, scores in results["per_image"].items()},
        {log_names[m]: v for m, v in results["mean"].items()}, results["runtime_s"], results["skipped"]))


def write_results(results: dict, out_path: str) -> list[str]:
    """results.json plus .csv, .md and .log beside it; returns the paths written. A failed write raises a
    RunFailure naming the file and those written before it."""
    paths = result_paths(out_path)
    texts = [json.dumps(results, indent=2) + "\n", _csv(results), _markdown(results), _log(results)]
    directory = _directory(out_path)
    with writing(directory):
        files.makedirs(directory)
    for i, (path, text) in enumerate(zip(paths, texts)):
        with writing(path, f"written before it: {', '.join(paths[:i]) or 'none'}"):
            write_text(path, text)
    return paths
