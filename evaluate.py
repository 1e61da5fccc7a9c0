r"""Score SR images with the protocol metrics (design/evaluation.md), from a directory or from a model.

Directory mode: score existing SR images.
  python evaluate.py --sr_dir results/drealsr --hr_dir ../shared/data/drealsr/test_HR \
      --metrics psnr,ssim,lpips,clipiqa,musiq,maniqa --weights_dir weights --out results/drealsr.json

Checkpoint mode: super-resolve the TFDS benchmark sets with a model bundle or a training workdir (its latest
finished checkpoint, or --step), then score the outputs and build the paper's tables (evaluation.md §11).
  python evaluate.py --checkpoint bundles/smfsr --datasets paired_sr/drealsr,paired_sr/realsr,lq_only/reallq250 \
      --data_dir tfds --seeds 1..20 --metrics psnr,ssim,lpips,musiq,maniqa,clipiqa --weights_dir weights --out results

Watch mode: follow a training workdir and evaluate each finished checkpoint once, as it appears.
  python evaluate.py --watch runs/student --datasets paired_sr/drealsr --data_dir tfds --metrics psnr,ssim \
      --max_images 16 [--poll_seconds 60] [--stop_after_seconds N] [--once]

Scoring (all modes): images are read as 8-bit RGB with alpha dropped; full-reference metrics (psnr, ssim, lpips)
compare with the reference of the same name, no-reference ones (clipiqa, musiq, maniqa) read only the SR image.
Unreadable images are skipped, counted and named; means are over the evaluated images. Metric weights:
--<metric>_weights PATH, or --weights_dir DIR holding DIR/<metric> (see smfsr_jax/evaluation/metrics.py).

Directory mode pairs files by name (Python sorted() order); full-reference metrics need --hr_dir with the same
names. Outputs, beside --out (x.json):
  x.json  {"per_image": {file: {metric: score}}, "mean": {metric: score}, "count": evaluated images,
           "skipped": {file: reason}, "runtime_s": {file: seconds}, "metrics": [...], "sr_dir", "hr_dir"}
  x.csv   one row per image: image, then one column per metric
  x.md    mean row and per-image rows (4 decimals), with the better direction per metric
  x.log   OSEDiff's per-image log format (evaluation.md §10)
On DRealSR's OSEDiff outputs, psnr,ssim give means 27.9243 / 0.7835, the published log's values.

Checkpoint mode reads each --datasets set (split test; smfsr_jax/evaluation/runner.py) and, per seed, samples
image k with fold_in(PRNGKey(seed), k), k its index in file order (evaluation.md §0), with the protocol
sampler (1 student step, AdaIN colour fix; --steps, --color_fix) and the records' captions (--nocaptions: the
NULL prompt). Full-reference metrics are scored only on sets with HR images. Outputs in --out:
  <dataset>/seed<s>/<LR stem>.png        SR images, 8-bit RGB, 4x the LR size
  <dataset>/seed<s>.json/.csv/.md/.log   that seed's scores, as in directory mode (plus dataset, seed, wall_s)
  table1.json/.md    the first seed's dataset means (evaluation.md §11, Table 1)
  table3.json/.md    with several seeds: mean ± population std (ddof 0) of the per-seed dataset means
  table4.json/.md    with seed 1 and any of seeds 2…7: mean LPIPS-Alex(seed k, seed 1) over images, per k;
                     needs LPIPS weights (--lpips_weights or --weights_dir) even when lpips is not in --metrics
                     (--notable4 skips it); <dataset>/seed<k>_vs_seed1.* hold the per-image distances
--seeds takes a list and ranges: 1, 1,2,5 or 1..20. --max_images N evaluates the first N images of each set;
--process_size below 512 (the protocol) makes small LR images cheaper, for quick runs of tiny models.

Watch mode evaluates every finished checkpoint of WORKDIR exactly once (never one being written), as checkpoint
mode does, into WORKDIR/eval/<step>/; it writes the first seed's dataset means as scalars "<dataset>/<metric>"
to TensorBoard (WORKDIR/eval, the "eval" run beside the training curves) and to WORKDIR/eval/metrics.jsonl, and
remembers the evaluated steps in WORKDIR/eval/state.json, so a restarted watcher skips them. It polls every
--poll_seconds and stops after one pass with --once, when the run has written bundle/ and every finished step
is evaluated, or once --stop_after_seconds have passed (a running evaluation is finished first). Keep
--max_images small for frequent checkpoints: every evaluation writes its SR images.
"""

import csv
import dataclasses
import json
import os
import sys
import time

import numpy as np
from absl import app, flags, logging
from tqdm import tqdm

from smfsr_jax.evaluation import runner, tables
from smfsr_jax.evaluation.io import UnreadableImageError, list_images, read_rgb8
from smfsr_jax.evaluation.metrics import REGISTRY, Metric, MissingWeightsError, build_metrics
from smfsr_jax.evaluation.osediff_log import evaluation_log, format_log
from smfsr_jax.sampling import bundle as bundle_lib
from smfsr_jax.sampling import color
from smfsr_jax.sampling.pipeline import PROCESS_SIZE, SRPipeline
from smfsr_jax.sr import parse_seeds
from smfsr_jax.training import checkpoints, inference, stages

DEFAULT_METRICS = ("psnr", "ssim", "lpips", "clipiqa", "musiq", "maniqa")
_MAX_NAMES_SHOWN = 20
EVAL_DIR = "eval"  # watch mode's folder in the workdir, also the TensorBoard collection
# Flags of one mode only; the benchmark flags belong to checkpoint and watch mode.
_BENCHMARK_FLAGS = ("datasets", "data_dir", "seeds", "steps", "color_fix", "captions", "max_images", "process_size",
                    "table4")
_MODE_FLAGS = {"sr_dir": ("hr_dir",), "checkpoint": ("step",) + _BENCHMARK_FLAGS,
               "watch": ("poll_seconds", "stop_after_seconds", "once") + _BENCHMARK_FLAGS}


def _define_flags():
    flags.DEFINE_string("sr_dir", None, "directory mode: directory of SR images")
    flags.DEFINE_string("hr_dir", None, "directory mode: directory of reference images (full-reference metrics)")
    flags.DEFINE_string("checkpoint", None, "checkpoint mode: model bundle or training workdir")
    flags.DEFINE_integer("step", None, "checkpoint mode with a workdir: the checkpoint step (default: the latest)")
    flags.DEFINE_string("watch", None, "watch mode: training workdir to follow")
    flags.mark_flags_as_mutual_exclusive(["sr_dir", "checkpoint", "watch"], required=True)
    flags.DEFINE_list("metrics", list(DEFAULT_METRICS), f"comma-separated, from {', '.join(REGISTRY)}")
    flags.DEFINE_string("out", None, "directory mode: results JSON path (.csv, .md, .log beside it); "
                                     "checkpoint mode: output directory")
    flags.DEFINE_string("weights_dir", None, "directory holding one weights entry per metric, under its name")
    for spec in REGISTRY.values():
        if spec.needs_weights:
            flags.DEFINE_string(spec.weights_flag, None, f"{spec.name} weights: {spec.weights_help}")
    flags.DEFINE_integer("batch_size", 8, "images per SR call and per metric call (same-size images)")
    flags.DEFINE_list("datasets", None, "TFDS benchmark sets, e.g. paired_sr/drealsr,lq_only/reallq250")
    flags.DEFINE_string("data_dir", None, "TFDS data directory holding --datasets")
    flags.DEFINE_string("seeds", "1", "seeds: a list and/or ranges, e.g. 1 or 1,2,5 or 1..20")
    flags.DEFINE_integer("steps", None, "sampling steps (default: 1 for a student, 40 for a teacher)")
    flags.DEFINE_enum("color_fix", "adain", color.METHODS, "colour correction after decoding")
    flags.DEFINE_bool("captions", True, "use the records' captions (--nocaptions: the NULL prompt)")
    flags.DEFINE_integer("max_images", None, "evaluate only the first N images of each set (quick runs)")
    flags.DEFINE_integer("process_size", PROCESS_SIZE, "LR sides below process_size/4 are upscaled first "
                                                       "(512 is the protocol; smaller for quick runs)")
    flags.DEFINE_bool("table4", True, "write Table 4 when seed 1 and some of seeds 2..7 are evaluated")
    flags.DEFINE_integer("poll_seconds", 60, "watch mode: seconds between looks at the workdir")
    flags.DEFINE_integer("stop_after_seconds", None, "watch mode: stop after this many seconds")
    flags.DEFINE_bool("once", False, "watch mode: one pass over the finished checkpoints, then stop")


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


def diversity_metric(metrics: dict[str, Metric], seeds, weights_paths=None, weights_dir=None) -> Metric | None:
    """The LPIPS metric of Table 4 when `seeds` allow one, else None; missing weights raise here, before any SR."""
    if not tables.diversity_seeds(seeds):
        return None
    if "lpips" in metrics:
        return metrics["lpips"]
    try:
        return build_metrics(["lpips"], weights_paths, weights_dir)["lpips"]
    except MissingWeightsError as e:
        raise MissingWeightsError(f"Table 4 (LPIPS between the outputs of seeds 2..7 and seed 1) needs LPIPS weights: "
                                  f"{e}; or pass --notable4") from None


@dataclasses.dataclass
class BenchmarkRun:
    """What checkpoint and watch mode evaluate: benchmark sets x seeds, the metrics and the sampler settings."""
    benchmarks: list[runner.BenchmarkSet]
    seeds: list[int]
    metrics: dict[str, Metric]
    diversity_metric: Metric | None = None  # LPIPS for Table 4 (`diversity_metric()`); None: no Table 4
    batch_size: int = 8
    steps: int | None = None
    color_fix: str = "adain"
    captions: bool = True
    process_size: int = PROCESS_SIZE


def _super_resolve_and_score(pipeline, benchmark: runner.BenchmarkSet, seed: int, run: BenchmarkRun, sr_dir: str,
                             show_progress: bool) -> dict:
    metrics = {name: m for name, m in run.metrics.items() if benchmark.has_reference or not m.full_reference}
    scores, skipped = Scores(metrics), {}
    progress = tqdm(total=benchmark.count, desc=f"{benchmark.dataset} seed {seed}", unit="image", file=sys.stderr,
                    disable=not show_progress)
    began = time.perf_counter()
    for chunk, outputs in runner.super_resolve(pipeline, benchmark.images(skipped, run.captions), seed, sr_dir,
                                               batch_size=run.batch_size, steps=run.steps, color_fix=run.color_fix):
        scores.add([image.name for image in chunk], outputs, [image.hr for image in chunk])
        progress.update(len(chunk))
    for name, reason in skipped.items():
        scores.skip(name, reason)
    progress.update(len(skipped))
    progress.close()
    reference = f"{benchmark.dataset} HR images ({runner.SPLIT} split)" if benchmark.has_reference else None
    return scores.results(sr_dir, reference, dataset=benchmark.dataset, seed=seed,
                          wall_s=time.perf_counter() - began)


def evaluate_model(bundle: bundle_lib.Bundle, run: BenchmarkRun, out_dir: str, show_progress: bool = True) -> dict:
    """Checkpoint mode on a loaded model: SR images, per-seed scores and tables in out_dir (module docstring).

    Returns {"table1": ..., ["table3": ..., "table4": ...]} as written (smfsr_jax/evaluation/tables.py).
    """
    pipeline = SRPipeline.from_bundle(bundle, batch_size=run.batch_size, process_size=run.process_size)
    times, guidance_scale = pipeline.sampler_settings(run.steps)
    setup = {"checkpoint": bundle.path, "kind": bundle.kind, "stage": bundle.meta.get("stage"),
             "step": bundle.meta.get("step"), "sampling_steps": len(times) - 1, "guidance_scale": guidance_scale,
             "color_fix": run.color_fix, "captions": run.captions, "process_size": run.process_size}
    results, diversity = {}, {}
    for benchmark in run.benchmarks:
        dataset_dir = os.path.join(out_dir, benchmark.dataset)
        by_seed = results[benchmark.dataset] = {}
        for seed in run.seeds:
            sr_dir = os.path.join(dataset_dir, f"seed{seed}")
            by_seed[seed] = _super_resolve_and_score(pipeline, benchmark, seed, run, sr_dir, show_progress)
            write_results(by_seed[seed], f"{sr_dir}.json")
        if run.diversity_metric is not None:
            reference_seed = tables.DIVERSITY_REFERENCE_SEED
            reference_dir = os.path.join(dataset_dir, f"seed{reference_seed}")
            diversity[benchmark.dataset] = {}
            for k in tables.diversity_seeds(run.seeds):
                names = sorted(set(by_seed[k]["per_image"]) & set(by_seed[reference_seed]["per_image"]))
                distances = evaluate_directory(os.path.join(dataset_dir, f"seed{k}"), reference_dir,
                                               {"lpips": run.diversity_metric}, run.batch_size, show_progress=False,
                                               names=names)
                write_results(distances, os.path.join(dataset_dir, f"seed{k}_vs_seed{reference_seed}.json"))
                diversity[benchmark.dataset][k] = distances["mean"].get("lpips", float("nan"))
    first = run.seeds[0]
    built = {"table1": tables.table1({d: by_seed[first] for d, by_seed in results.items()}, first, run.metrics,
                                     setup)}
    if len(run.seeds) > 1:
        built["table3"] = tables.table3(results, run.seeds, run.metrics, setup)
    if run.diversity_metric is not None:
        built["table4"] = tables.table4(diversity, tables.diversity_seeds(run.seeds), setup)
    for table in built.values():
        tables.write_table(table, out_dir)
    return built


def _read_state(path: str) -> list[int]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        try:
            return [int(step) for step in json.load(f)["evaluated"]]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: expected {{\"evaluated\": [steps]}} ({type(e).__name__}: {e}); delete it to "
                             "evaluate every checkpoint again") from None


def _write_state(path: str, evaluated: list[int]):
    partial = f"{path}.partial"  # replaced in one step: a killed watcher never leaves half a file
    with open(partial, "w") as f:
        json.dump({"evaluated": sorted(evaluated)}, f)
        f.write("\n")
    os.replace(partial, path)


def _eval_writer(workdir: str):
    """TensorBoard events in WORKDIR/eval (the "eval" run beside training's) and WORKDIR/eval/metrics.jsonl."""
    from clu import metric_writers  # imports TensorFlow (3 s): only watch mode pays for it

    from smfsr_jax.training import writers
    tensorboard = metric_writers.create_default_writer(workdir, collection=EVAL_DIR, asynchronous=False)
    return metric_writers.MultiWriter(
        [tensorboard, writers.JsonlWriter(os.path.join(workdir, EVAL_DIR, "metrics.jsonl"))])


def watch(workdir: str, run: BenchmarkRun, *, poll_seconds: float = 60, stop_after_seconds: float | None = None,
          once: bool = False, show_progress: bool = True, sleep=time.sleep) -> list[int]:
    """Watch mode (module docstring): evaluate the finished checkpoints of `workdir` not evaluated yet, until a
    stop condition; returns the steps evaluated by this call."""
    paths = stages.workdir_paths(workdir)
    config = inference.read_config(workdir)  # also checks that workdir is a training workdir
    eval_dir = os.path.join(workdir, EVAL_DIR)
    os.makedirs(eval_dir, exist_ok=True)
    state_path = os.path.join(eval_dir, "state.json")
    evaluated = _read_state(state_path)
    deadline = None if stop_after_seconds is None else time.monotonic() + stop_after_seconds
    stage = writer = None
    evaluated_now = []
    try:
        while True:
            # Looked at before listing: once the bundle exists, every checkpoint listed after it is final.
            run_finished = os.path.isfile(os.path.join(paths["bundle"], bundle_lib.BUNDLE_FILE))
            pending = [s for s in checkpoints.finished_steps(paths["checkpoints"]) if s not in evaluated]
            for step in pending:
                if deadline is not None and time.monotonic() >= deadline:
                    break
                if stage is None:  # frozen weights, built once
                    stage = stages.build_stage(config)
                try:
                    bundle = inference.load_checkpoint(workdir, step, stage)
                except Exception:  # keep_checkpoints may delete an old step while it is read: skip only that
                    if step in checkpoints.finished_steps(paths["checkpoints"]):
                        raise
                    logging.warning("step %d was deleted (keep_checkpoints) before it could be evaluated", step)
                    continue
                logging.info("evaluating step %d of %s", step, workdir)
                built = evaluate_model(bundle, run, os.path.join(eval_dir, str(step)), show_progress)
                scalars = {f"{dataset}/{metric}": value for dataset, row in built["table1"]["datasets"].items()
                           for metric, value in row["mean"].items()}
                if writer is None:
                    writer = _eval_writer(workdir)
                writer.write_scalars(step, scalars)
                writer.flush()
                evaluated.append(step)
                _write_state(state_path, evaluated)
                evaluated_now.append(step)
            all_done = not set(checkpoints.finished_steps(paths["checkpoints"])) - set(evaluated)
            if once or (run_finished and all_done):
                return evaluated_now
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                logging.info("watch: stopping after %s s", stop_after_seconds)
                return evaluated_now
            sleep(poll_seconds if remaining is None else min(poll_seconds, remaining))
    finally:
        if writer is not None:
            writer.close()


def _check_mode_flags(FLAGS) -> str:
    mode = next(name for name in _MODE_FLAGS if FLAGS[name].value is not None)
    foreign = sorted({f for other, names in _MODE_FLAGS.items() if other != mode for f in names}
                     - set(_MODE_FLAGS[mode]))
    given = [f"--{name}" for name in foreign if FLAGS[name].present]
    if given:
        raise app.UsageError(f"--{mode} does not take {', '.join(given)}")
    if mode in ("sr_dir", "checkpoint") and FLAGS.out is None:
        raise app.UsageError(f"--{mode} needs --out")
    if mode == "watch" and FLAGS.out is not None:
        raise app.UsageError(f"watch mode writes under WORKDIR/{EVAL_DIR}; --out does not apply")
    if mode != "sr_dir" and not (FLAGS.datasets and FLAGS.data_dir):
        raise app.UsageError(f"--{mode} needs --datasets and --data_dir")
    for name, least in (("batch_size", 1), ("steps", 1), ("max_images", 1), ("process_size", 4),
                        ("poll_seconds", 0), ("stop_after_seconds", 0)):
        if FLAGS[name].value is not None and FLAGS[name].value < least:
            raise app.UsageError(f"--{name} must be >= {least}, got {FLAGS[name].value}")
    return mode


def _print_tables(built: dict, out_dir: str):
    for table in built.values():
        print(tables.markdown(table))
    print(f"wrote {', '.join(built)} (.json, .md) and the per-seed results in {out_dir}")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    FLAGS = flags.FLAGS
    mode = _check_mode_flags(FLAGS)
    weights_paths = {name: getattr(FLAGS, spec.weights_flag) for name, spec in REGISTRY.items()
                     if spec.needs_weights}
    try:  # bad flags, missing weights, mismatched names, unreadable datasets or models: a message, no traceback
        if mode == "sr_dir":
            metrics = build_metrics(FLAGS.metrics, weights_paths, FLAGS.weights_dir)
            results = evaluate_directory(FLAGS.sr_dir, FLAGS.hr_dir, metrics, FLAGS.batch_size)
        else:  # cheap checks first, then the metric networks, then the model
            seeds = parse_seeds(FLAGS.seeds)
            benchmarks = [runner.BenchmarkSet(d, FLAGS.data_dir, FLAGS.max_images) for d in FLAGS.datasets]
            metrics = build_metrics(FLAGS.metrics, weights_paths, FLAGS.weights_dir)
            run = BenchmarkRun(
                benchmarks=benchmarks, seeds=seeds, metrics=metrics,
                diversity_metric=(diversity_metric(metrics, seeds, weights_paths, FLAGS.weights_dir)
                                  if FLAGS.table4 else None),
                batch_size=FLAGS.batch_size, steps=FLAGS.steps, color_fix=FLAGS.color_fix, captions=FLAGS.captions,
                process_size=FLAGS.process_size)
            if mode == "checkpoint":
                bundle = runner.load_model(FLAGS.checkpoint, FLAGS.step)
            else:
                inference.read_config(FLAGS.watch)  # a training workdir, checked before waiting on it
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"evaluate.py: {e}")
    if mode == "checkpoint":
        _print_tables(evaluate_model(bundle, run, FLAGS.out), FLAGS.out)
    elif mode == "watch":
        steps = watch(FLAGS.watch, run, poll_seconds=FLAGS.poll_seconds, stop_after_seconds=FLAGS.stop_after_seconds,
                      once=FLAGS.once)
        print(f"evaluated steps {steps or 'none'}; outputs in {os.path.join(FLAGS.watch, EVAL_DIR)}")
    else:
        paths = write_results(results, FLAGS.out)
        means = "; ".join(f"{REGISTRY[m].log_name}: {v:.4f}" for m, v in results["mean"].items())
        print(f"{results['count']} images, {len(results['skipped'])} skipped"
              + (f" ({', '.join(results['skipped'])})" if results["skipped"] else "") + f" | {means}")
        print("wrote " + ", ".join(paths))


if __name__ == "__main__":
    _define_flags()
    app.run(main)
