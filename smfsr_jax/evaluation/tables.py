"""The paper's result tables from per-seed dataset means (docs/design.md#paper-tables), as JSON and Markdown.

Table 1: each dataset's mean per metric for one seed (no-reference metrics only on LR-only sets).
Table 3: mean ± population std (ddof 0) over seeds of the per-seed dataset means.
Table 4: diversity, the mean over images of LPIPS(seed-k output, seed-1 output) for k = 2…7.
Markdown shows 4 decimals, as the papers do; JSON keeps full floats. `setup` (checkpoint, sampler
settings, ...) is stored in each table as given.

Tables 1 and 3 also carry the SMFSR paper's numbers for the released smfsr_q (PAPER_RESULTS), so one table
shows how close a run is: JSON "paper" {dataset: {metric: value or null}} and "difference" {dataset: {metric:
ours − paper or null}} beside "datasets"; Markdown prints a "paper" and an "ours − paper" row under each dataset,
with "–" where the paper reports no number or we computed none (docs/reproduce.md).
"""

import json
import os

import jax
import numpy as np

from smfsr_jax.core import files
from smfsr_jax.evaluation.metrics import REGISTRY

TABLE1_ORDER = ("clipiqa", "musiq", "maniqa", "psnr", "ssim", "lpips")  # the paper's column orders
TABLE3_ORDER = ("psnr", "ssim", "lpips", "musiq", "maniqa", "clipiqa")
DIVERSITY_REFERENCE_SEED = 1
DIVERSITY_SEEDS = (2, 3, 4, 5, 6, 7)
_ABSENT = "–"

# The SMFSR paper's numbers for the released smfsr_q: {table: {dataset: {metric: value}}}, datasets named as the
# TFDS benchmark sets the evaluator reads, metrics as in REGISTRY. Table 1: one run with LLaVA captions (PSNR and
# MUSIQ given to 2 decimals there). Table 3: {"mean", "std"} over 20 seeds; only DRealSR's PSNR is recorded here.
# Table 4 has no entry: only approximate values are known (docs/reproduce.md), too coarse for a difference.
PAPER_RESULTS = {
    1: {
        "paired_sr/div2k_val": {"clipiqa": 0.7545, "musiq": 69.97, "maniqa": 0.6611, "psnr": 22.18, "ssim": 0.5261,
                                "lpips": 0.3634},
        "paired_sr/drealsr": {"clipiqa": 0.7161, "musiq": 65.93, "maniqa": 0.6220, "psnr": 26.35, "ssim": 0.7021,
                              "lpips": 0.3860},
        "paired_sr/realsr": {"clipiqa": 0.7065, "musiq": 69.17, "maniqa": 0.6642, "psnr": 23.14, "ssim": 0.6535,
                             "lpips": 0.3667},
        "lq_only/reallq250": {"clipiqa": 0.7772, "musiq": 72.21, "maniqa": 0.6410},  # no ground truth
    },
    3: {
        "paired_sr/drealsr": {"psnr": {"mean": 26.3852, "std": 0.0198}},
    },
}


def ordered_metrics(metrics, order) -> list[str]:
    """`metrics` in the table's column order, then any others in registry order."""
    known = [m for m in order if m in metrics]
    return known + [m for m in REGISTRY if m in metrics and m not in known]


def diversity_seeds(seeds) -> list[int]:
    """The seeds k of Table 4 that a run over `seeds` can compare with seed 1 (none without seed 1)."""
    return [k for k in DIVERSITY_SEEDS if k in seeds] if DIVERSITY_REFERENCE_SEED in seeds else []


def paper_value(table: int, dataset: str, metric: str):
    """The paper's number for one cell of `table` (a float; {"mean", "std"} in Table 3), None where it reports none."""
    return PAPER_RESULTS.get(table, {}).get(dataset, {}).get(metric)


def _difference(ours, paper):
    """ours − paper, None when either is missing."""
    return None if ours is None or paper is None else ours - paper


def _mean(cell):
    """The mean of a Table 3 cell ({"mean", "std", ...}), None for an absent cell."""
    return None if cell is None else cell["mean"]


def table1(results: dict, seed: int, metrics, setup: dict) -> dict:
    """results {dataset: directory-mode results of `seed`} -> Table 1, with the paper's numbers."""
    order = ordered_metrics(metrics, TABLE1_ORDER)
    paper = {dataset: {m: paper_value(1, dataset, m) for m in order} for dataset in results}
    difference = {dataset: {m: _difference(r["mean"].get(m), paper[dataset][m]) for m in order}
                  for dataset, r in results.items()}
    return {"table": 1, "seed": seed, "metrics": order, "setup": setup,
            "datasets": {dataset: {"count": r["count"], "mean": r["mean"]} for dataset, r in results.items()},
            "paper": paper, "difference": difference}


def table3(results: dict, seeds, metrics, setup: dict) -> dict:
    """results {dataset: {seed: directory-mode results}} -> Table 3 over `seeds`, with the paper's numbers
    ({"mean", "std"}) and the difference of the means."""
    order = ordered_metrics(metrics, TABLE3_ORDER)
    datasets = {}
    for dataset, by_seed in results.items():
        rows = {}
        for metric in by_seed[seeds[0]]["mean"]:
            means = np.array([by_seed[seed]["mean"][metric] for seed in seeds], np.float64)
            rows[metric] = {"mean": float(means.mean()), "std": float(means.std(ddof=0)), "per_seed": means.tolist()}
        datasets[dataset] = rows
    paper = {dataset: {m: paper_value(3, dataset, m) for m in order} for dataset in datasets}
    # Of the means only: the stds are spreads over seeds, shown side by side.
    difference = {dataset: {m: _difference(_mean(rows.get(m)), _mean(paper[dataset][m])) for m in order}
                  for dataset, rows in datasets.items()}
    return {"table": 3, "seeds": list(seeds), "ddof": 0, "metrics": order, "setup": setup, "datasets": datasets,
            "paper": paper, "difference": difference}


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


def _mean_std(cell: dict) -> str:
    return f"{cell['mean']:.4f} ± {cell['std']:.4f}"


def _cells(values, form) -> list[str]:
    """Markdown cells of `values` formatted by `form`, the absent marker for None."""
    return [_ABSENT if value is None else form(value) for value in values]


def _paper_rows(table: dict, dataset: str, form, blank_cells: int) -> list[str]:
    """The "paper" and "ours − paper" rows under `dataset`; `blank_cells` empty cells follow the label."""
    metrics, blank = table["metrics"], [""] * blank_cells
    paper = _cells([table["paper"][dataset][m] for m in metrics], form)
    difference = _cells([table["difference"][dataset][m] for m in metrics], "{:+.4f}".format)
    return ["| " + " | ".join(["paper"] + blank + paper) + " |",
            "| " + " | ".join(["ours − paper"] + blank + difference) + " |"]


_PAPER_NOTE = ("Under each dataset: the SMFSR paper's number for the released smfsr_q (paper) and ours − paper; "
               f"{_ABSENT} where the paper reports none or this run computed none.")


def markdown(table: dict) -> str:
    number = table["table"]
    if number == 1:
        lines = [f"Table 1: dataset means, seed {table['seed']}. {_PAPER_NOTE} The paper gives PSNR and MUSIQ to "
                 "2 decimals.", ""]
        lines += _header(["dataset", "images"] + [_column(m) for m in table["metrics"]])
        for dataset, row in table["datasets"].items():
            cells = _cells([row["mean"].get(m) for m in table["metrics"]], "{:.4f}".format)
            lines.append("| " + " | ".join([dataset, str(row["count"])] + cells) + " |")
            lines += _paper_rows(table, dataset, "{:.4f}".format, blank_cells=1)  # blank: the images column
    elif number == 3:
        lines = [f"Table 3: mean ± std (ddof 0) over seeds {', '.join(map(str, table['seeds']))} of the dataset "
                 f"means. {_PAPER_NOTE} The difference is of the means.", ""]
        lines += _header(["dataset"] + [_column(m) for m in table["metrics"]])
        for dataset, rows in table["datasets"].items():
            cells = _cells([rows.get(m) for m in table["metrics"]], _mean_std)
            lines.append("| " + " | ".join([dataset] + cells) + " |")
            lines += _paper_rows(table, dataset, _mean_std, blank_cells=0)
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
    """out_dir/table<n>.json and .md (out_dir local or in a bucket), each written whole; returns the paths."""
    stem = os.path.join(out_dir, f"table{table['table']}")
    files.write_text(f"{stem}.json", json.dumps(table, indent=2) + "\n")
    files.write_text(f"{stem}.md", markdown(table))
    return [f"{stem}.json", f"{stem}.md"]


def print_tables(built: dict, out_dir: str):
    """Process 0 prints the tables it wrote; the others say what they wrote."""
    if jax.process_index() > 0:
        print(f"process {jax.process_index()}: wrote the SR images of its share in {out_dir}")
        return
    for table in built.values():
        print(markdown(table))
    print(f"wrote {', '.join(built)} (.json, .md) and the per-seed results in {out_dir}")
