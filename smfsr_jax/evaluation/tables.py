"""The paper's result tables from per-seed dataset means (docs/design.md#paper-tables), as JSON and Markdown.

Table 1: each dataset's mean per metric for one seed (no-reference metrics only on LR-only sets).
Table 3: mean ± population std (ddof 0) over seeds of the per-seed dataset means.
Table 4: diversity, the mean over images of LPIPS(seed-k output, seed-1 output) for k = 2…7.
Markdown shows 4 decimals, as the papers do; JSON keeps full floats. `setup` (checkpoint, sampler
settings, ...) is stored in each table as given.
"""

import json
import os

import numpy as np

from smfsr_jax.evaluation.metrics import REGISTRY

TABLE1_ORDER = ("clipiqa", "musiq", "maniqa", "psnr", "ssim", "lpips")  # the paper's column orders
TABLE3_ORDER = ("psnr", "ssim", "lpips", "musiq", "maniqa", "clipiqa")
DIVERSITY_REFERENCE_SEED = 1
DIVERSITY_SEEDS = (2, 3, 4, 5, 6, 7)
_ABSENT = "–"


def ordered_metrics(metrics, order) -> list[str]:
    """`metrics` in the table's column order, then any others in registry order."""
    known = [m for m in order if m in metrics]
    return known + [m for m in REGISTRY if m in metrics and m not in known]


def diversity_seeds(seeds) -> list[int]:
    """The seeds k of Table 4 that a run over `seeds` can compare with seed 1 (none without seed 1)."""
    return [k for k in DIVERSITY_SEEDS if k in seeds] if DIVERSITY_REFERENCE_SEED in seeds else []


def table1(results: dict, seed: int, metrics, setup: dict) -> dict:
    """results {dataset: directory-mode results of `seed`} -> Table 1."""
    return {"table": 1, "seed": seed, "metrics": ordered_metrics(metrics, TABLE1_ORDER), "setup": setup,
            "datasets": {dataset: {"count": r["count"], "mean": r["mean"]} for dataset, r in results.items()}}


def table3(results: dict, seeds, metrics, setup: dict) -> dict:
    """results {dataset: {seed: directory-mode results}} -> Table 3 over `seeds`."""
    datasets = {}
    for dataset, by_seed in results.items():
        rows = {}
        for metric in by_seed[seeds[0]]["mean"]:
            means = np.array([by_seed[seed]["mean"][metric] for seed in seeds], np.float64)
            rows[metric] = {"mean": float(means.mean()), "std": float(means.std(ddof=0)), "per_seed": means.tolist()}
        datasets[dataset] = rows
    return {"table": 3, "seeds": list(seeds), "ddof": 0, "metrics": ordered_metrics(metrics, TABLE3_ORDER),
            "setup": setup, "datasets": datasets}


def table4(lpips_by_seed: dict, seeds, setup: dict) -> dict:
    """lpips_by_seed {dataset: {k: mean LPIPS(seed k, seed 1)}} -> Table 4 for the seeds k."""
    datasets = {dataset: {"per_seed": [by_seed[k] for k in seeds], "mean": float(np.mean([by_seed[k] for k in seeds]))}
                for dataset, by_seed in lpips_by_seed.items()}
    return {"table": 4, "reference_seed": DIVERSITY_REFERENCE_SEED, "seeds": list(seeds), "metric": "lpips",
            "setup": setup, "datasets": datasets}


def _header(labels) -> list[str]:
    return ["| " + " | ".join(labels) + " |", "|---|" + "---:|" * (len(labels) - 1)]


def _column(metric: str) -> str:
    spec = REGISTRY[metric]
    return f"{spec.log_name} {'↓' if spec.lower_better else '↑'}"


def _setup_line(setup: dict) -> str:
    return "; ".join(f"{key}: {value}" for key, value in setup.items())


def markdown(table: dict) -> str:
    number = table["table"]
    if number == 1:
        lines = [f"Table 1: dataset means, seed {table['seed']}.", ""]
        lines += _header(["dataset", "images"] + [_column(m) for m in table["metrics"]])
        for dataset, row in table["datasets"].items():
            cells = [f"{row['mean'][m]:.4f}" if m in row["mean"] else _ABSENT for m in table["metrics"]]
            lines.append("| " + " | ".join([dataset, str(row["count"])] + cells) + " |")
    elif number == 3:
        lines = [f"Table 3: mean ± std (ddof 0) over seeds {', '.join(map(str, table['seeds']))} of the dataset "
                 "means.", ""]
        lines += _header(["dataset"] + [_column(m) for m in table["metrics"]])
        for dataset, rows in table["datasets"].items():
            cells = [f"{rows[m]['mean']:.4f} ± {rows[m]['std']:.4f}" if m in rows else _ABSENT
                     for m in table["metrics"]]
            lines.append("| " + " | ".join([dataset] + cells) + " |")
    elif number == 4:
        lines = [f"Table 4: mean LPIPS between the seed-k and seed-{table['reference_seed']} outputs.", ""]
        lines += _header(["dataset"] + [f"seed {k}" for k in table["seeds"]] + ["mean"])
        for dataset, row in table["datasets"].items():
            cells = [f"{v:.4f}" for v in row["per_seed"]] + [f"{row['mean']:.4f}"]
            lines.append("| " + " | ".join([dataset] + cells) + " |")
    else:
        raise ValueError(f"no table {number}")
    return "\n".join(lines + ["", f"Setup: {_setup_line(table['setup'])}."]) + "\n"


def write_table(table: dict, out_dir: str) -> list[str]:
    """out_dir/table<n>.json and .md; returns the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, f"table{table['table']}")
    with open(f"{stem}.json", "w") as f:
        json.dump(table, f, indent=2)
        f.write("\n")
    with open(f"{stem}.md", "w") as f:
        f.write(markdown(table))
    return [f"{stem}.json", f"{stem}.md"]
