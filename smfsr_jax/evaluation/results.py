"""Writing one set of scores: x.json plus x.csv, x.md and OSEDiff's per-image log x.log beside it."""

import csv
import json
import os

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
