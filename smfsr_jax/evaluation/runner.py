"""Checkpoint mode: super-resolve the LR images of TFDS benchmark sets with a model, one seed at a time, score
them and build the paper's tables (`evaluate.py --checkpoint`, and each step of watch mode).

The sets are the project's `paired_sr/*` (LR + HR) and `lq_only/*` (LR only) builders, split `test`,
read in record order (the builders write file-name order). Image k (its record
index) is sampled with fold_in(PRNGKey(seed), k), so an image's output does not depend on --max_images,
on batching or on the other images. SR images are written as 8-bit PNGs named like the LR file
(`<stem>.png`); a second LR file with the same stem is skipped and named, as `python -m smfsr_jax.sr` does.

The model is a bundle directory or a training workdir (its latest finished checkpoint, or `step`); it and the output
directory may be local or in a bucket (gs://...). A write that fails part-way raises a RunFailure naming the file
and the per-seed results already written.

Devices and processes: SR goes through the batch runner (sampling/runner.py), `batch_size` images per local
device per call; metric calls take `batch_size` images. With several processes (jax.distributed,
core/distributed.py) every process runs `evaluate_model` with the same arguments: process p of n super-resolves, writes and scores the records k with
k % n == p, the per-image scores, runtimes and skipped records of all processes are gathered (process_allgather,
so no shared filesystem is needed for them), and process 0 alone writes the results files and tables, the same
as one process writes (up to the timings). Table 4's distances are computed by the process that wrote both images.
"""

import dataclasses
import functools
import os
import sys
import time
from typing import Iterator, Optional, Sequence

import jax
import numpy as np
from tqdm import tqdm

from smfsr_jax.core import distributed, errors, files
from smfsr_jax.core import workdir as workdir_lib
from smfsr_jax.data import images as image_io
from smfsr_jax.data.pipeline import open_source, record_text
from smfsr_jax.evaluation import tables
from smfsr_jax.evaluation.directory import Scores, evaluate_directory
from smfsr_jax.evaluation.metrics import Metric, MissingWeightsError, build_metrics
from smfsr_jax.evaluation.results import write_results, writing
from smfsr_jax.sampling.model import SRModel
from smfsr_jax.sampling.runner import SRInput, super_resolve
from smfsr_jax.sampling.settings import SRSettings
from smfsr_jax.training import inference
from smfsr_jax.weights import bundle as bundle_lib

SPLIT = "test"
BENCHMARK_BUILDERS = ("paired_sr", "lq_only")  # the sets with LR images


@dataclasses.dataclass
class BenchmarkImage:
    index: int  # record index: the noise index k
    name: str  # the SR file name, <LR stem>.png
    lr: np.ndarray  # (h, w, 3) uint8
    hr: Optional[np.ndarray]  # (4h, 4w, 3) uint8, None for LR-only sets
    caption: Optional[str]  # None: the NULL prompt


def _output_name(file_name: str) -> str:
    return os.path.splitext(os.path.basename(file_name))[0] + ".png"


class BenchmarkSet:
    """The first `max_images` records of one TFDS benchmark set; `images()` decodes them lazily."""

    def __init__(self, dataset: str, data_dir: str, max_images: Optional[int] = None):
        from smfsr_jax.data.tfds import BUILDERS  # imports TensorFlow Datasets: not for directory mode

        name, _, config = dataset.partition("/")
        if name not in BENCHMARK_BUILDERS or not config:
            raise ValueError(f"{dataset!r} is not a benchmark set; expected "
                             f"{' or '.join(f'{b}/<config>' for b in BENCHMARK_BUILDERS)}")
        try:
            builder = BUILDERS[name](data_dir=data_dir, config=config)
        except ValueError as e:  # an unknown config
            raise ValueError(f"{dataset}: {e}") from None
        # Checked first, to answer an unbuilt set with the command that builds it.
        if not builder.is_prepared():
            raise FileNotFoundError(f"{dataset} is not built in {data_dir}: python -m smfsr_jax.data.build "
                                    f"--dataset {dataset} --manual_dir SOURCE_FILES --data_dir {data_dir}")
        self.source = open_source(dataset, SPLIT, data_dir)
        self.dataset = dataset
        self.has_reference = "hr" in builder.info.features
        self.count = len(self.source) if max_images is None else min(max_images, len(self.source))

    @functools.cached_property
    def first_with_name(self) -> dict[str, tuple[int, str]]:
        """{SR output name: (index, file name) of the first record with it}; later records with that output name
        are skipped. From every record's name (read once), so that processes given different records agree."""
        first = {}
        for index in range(self.count):
            try:
                name = record_text(self.source[index]["file_name"])
            except (KeyError, ValueError, OSError):  # `images` skips the record with the reason
                continue
            first.setdefault(_output_name(name), (index, name))
        return first

    def images(self, skipped: dict, use_captions: bool = True,
               indices: Optional[Sequence[int]] = None) -> Iterator[BenchmarkImage]:
        """The decoded records `indices` (default all, in order); unreadable ones and repeated output names go to
        `skipped` {name: reason}."""
        for index in range(self.count) if indices is None else indices:
            name = f"record {index}"
            try:
                record = self.source[index]
                name = record_text(record["file_name"])
                output_name = _output_name(name)
                first_index, first_name = self.first_with_name[output_name]
                if first_index != index:
                    raise ValueError(f"same output name {output_name} as {first_name}")
                lr = image_io.decode_rgb8(record["lr"], name)
                hr = image_io.decode_rgb8(record["hr"], name) if self.has_reference else None
            except (KeyError, ValueError, OSError) as e:  # image_io.BadImage is a ValueError
                skipped[name] = str(e)
                continue
            caption = record_text(record["caption"]).strip() if use_captions else ""
            yield BenchmarkImage(index, output_name, lr, hr, caption or None)


def load_model(path: str, step: Optional[int] = None) -> bundle_lib.Bundle:
    """A model bundle, or a training workdir at `step` (default: its latest finished checkpoint)."""
    if files.is_file(files.join(path, bundle_lib.BUNDLE_FILE)):
        if step is not None:
            raise ValueError(f"{path} is a model bundle; a step applies to training workdirs only")
        return bundle_lib.load_bundle(path)
    if workdir_lib.is_workdir(path):
        return inference.load_checkpoint(path, step)
    raise FileNotFoundError(f"{path}: neither a model bundle ({bundle_lib.BUNDLE_FILE}) nor a training workdir "
                            f"({workdir_lib.CONFIG})")


# ---------------------------------------------------------------------------------------------
# Checkpoint mode: SR of the benchmark sets with one model, scores and tables.

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
    """What checkpoint and watch mode evaluate: benchmark sets x seeds, the metrics and the SR settings (their
    batch_size is also the metric calls')."""
    benchmarks: list[BenchmarkSet]
    seeds: list[int]
    metrics: dict[str, Metric]
    diversity_metric: Metric | None = None  # LPIPS for Table 4 (`diversity_metric()`); None: no Table 4
    settings: SRSettings = SRSettings(batch_size=8)
    captions: bool = True


def _gathered(metrics: dict[str, Metric], per_image: dict, runtimes: dict, skipped: dict) -> Scores:
    """Scores of every process's images, from each process's own per-image scores, runtimes and skipped images."""
    merged = Scores(metrics)
    for part_scores, part_runtimes, part_skipped in distributed.gather([per_image, runtimes, skipped]):
        merged.per_image.update(part_scores)
        merged.runtimes.update(part_runtimes)
        merged.skipped.update(part_skipped)
    return merged


def _super_resolve_and_score(model: SRModel, settings: SRSettings, benchmark: BenchmarkSet, seed: int,
                             run: BenchmarkRun, sr_dir: str, show_progress: bool) -> tuple[dict, list[str]]:
    """(results of the whole set, the SR images this process wrote): process p of n super-resolves and scores
    the records k with k % n == p, then the scores of all processes are gathered."""
    metrics = {name: m for name, m in run.metrics.items() if benchmark.has_reference or not m.full_reference}
    scores, skipped = Scores(metrics), {}
    indices = distributed.share(range(benchmark.count))
    progress = tqdm(total=len(indices), desc=f"{benchmark.dataset} seed {seed}", unit="image", file=sys.stderr,
                    disable=not show_progress)
    with writing(sr_dir):
        files.makedirs(sr_dir)
    unscored = []  # (image, SR) written and waiting for a metric call of batch_size images

    def score():
        scores.add([image.name for image, _ in unscored], [sr for _, sr in unscored],
                   [image.hr for image, _ in unscored])
        unscored.clear()

    def write(item: SRInput, _, sr: np.ndarray):
        path = os.path.join(sr_dir, item.tag.name)
        with writing(path):
            image_io.save_image(sr, path)
        unscored.append((item.tag, sr))
        if len(unscored) == settings.batch_size:
            score()
        progress.update(1)

    began = time.perf_counter()
    inputs = (SRInput(image.index, image.lr, image.caption, tag=image)
              for image in benchmark.images(skipped, run.captions, indices))
    super_resolve(model, settings, inputs, [seed], write)
    if unscored:
        score()
    progress.update(len(skipped))
    progress.close()
    written = sorted(scores.per_image)
    scores = _gathered(metrics, scores.per_image, scores.runtimes, skipped)
    reference = f"{benchmark.dataset} HR images ({SPLIT} split)" if benchmark.has_reference else None
    # wall_s: after the gather, so the slowest process's time
    return scores.results(sr_dir, reference, dataset=benchmark.dataset, seed=seed,
                          wall_s=time.perf_counter() - began), written


def evaluate_model(bundle: bundle_lib.Bundle, run: BenchmarkRun, out_dir: str, show_progress: bool = True) -> dict:
    """Checkpoint mode on a loaded model: SR images, per-seed scores and tables in out_dir (module docstring).

    Returns {"table1": ..., ["table3": ..., "table4": ...]} as written (smfsr_jax/evaluation/tables.py).
    """
    model = SRModel(bundle)
    settings = model.resolve(run.settings)
    setup = {"checkpoint": bundle.path, "kind": bundle.kind, "stage": bundle.meta.get("stage"),
             "step": bundle.meta.get("step"), "sampling_steps": settings.steps,
             "guidance_scale": settings.guidance_scale, "color_fix": settings.color_fix, "captions": run.captions,
             "process_size": settings.process_size}
    results, diversity, written = {}, {}, []
    writes = jax.process_index() == 0  # the results and tables; every process writes the SR images of its share
    try:
        for benchmark in run.benchmarks:
            dataset_dir = os.path.join(out_dir, benchmark.dataset)
            by_seed = results[benchmark.dataset] = {}
            own_images = {}  # seed -> the SR images this process wrote
            for seed in run.seeds:
                sr_dir = os.path.join(dataset_dir, f"seed{seed}")
                by_seed[seed], own_images[seed] = _super_resolve_and_score(model, settings, benchmark, seed,
                                                                           run, sr_dir, show_progress)
                if writes:
                    write_results(by_seed[seed], f"{sr_dir}.json")
                written.append(f"{benchmark.dataset}/seed{seed}")
            if run.diversity_metric is not None:
                reference_seed = tables.DIVERSITY_REFERENCE_SEED
                reference_dir = os.path.join(dataset_dir, f"seed{reference_seed}")
                diversity[benchmark.dataset] = {}
                lpips = {"lpips": run.diversity_metric}
                for k in tables.diversity_seeds(run.seeds):
                    # Each process compares the images it wrote (a process may not see the others' files).
                    names = sorted(set(own_images[k]) & set(own_images[reference_seed]))
                    own = evaluate_directory(os.path.join(dataset_dir, f"seed{k}"), reference_dir, lpips,
                                             run.settings.batch_size, show_progress=False, names=names)
                    distances = _gathered(lpips, own["per_image"], own["runtime_s"], own["skipped"]).results(
                        own["sr_dir"], own["hr_dir"])
                    if writes:
                        write_results(distances, os.path.join(dataset_dir, f"seed{k}_vs_seed{reference_seed}.json"))
                    diversity[benchmark.dataset][k] = distances["mean"].get("lpips", float("nan"))
        first = run.seeds[0]
        built = {"table1": tables.table1({d: by_seed[first] for d, by_seed in results.items()}, first, run.metrics,
                                         setup)}
        if len(run.seeds) > 1:
            built["table3"] = tables.table3(results, run.seeds, run.metrics, setup)
        if run.diversity_metric is not None:
            built["table4"] = tables.table4(diversity, tables.diversity_seeds(run.seeds), setup)
        if writes:
            for table in built.values():
                with writing(out_dir):
                    tables.write_table(table, out_dir)
    except errors.RunFailure as e:  # say which results are complete on disk
        raise errors.RunFailure(f"{e}; complete results in {out_dir}: {', '.join(written) or 'none'}") from e
    return built
