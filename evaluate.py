r"""Score SR images with the protocol metrics (docs/design.md#evaluation), from a directory or from a model.

Directory mode: score existing SR images.
  python evaluate.py --sr_dir results/drealsr --hr_dir path/to/drealsr/test_HR \
      --metrics psnr,ssim,lpips,clipiqa,musiq,maniqa --weights_dir weights --out results/drealsr.json

Checkpoint mode: super-resolve the TFDS benchmark sets with a model bundle or a training workdir (its latest
finished checkpoint, or --step), then score the outputs and build the paper's tables (docs/design.md#paper-tables).
  python evaluate.py --checkpoint bundles/smfsr --datasets paired_sr/drealsr,paired_sr/realsr,lq_only/reallq250 \
      --data_dir tfds --seeds 1..20 --metrics psnr,ssim,lpips,musiq,maniqa,clipiqa --weights_dir weights --out results
  python evaluate.py --model zw121/SMFSR/smfsr_q --base stabilityai/stable-diffusion-3.5-medium \
      [--null_embeddings DIR] [--cache_dir DIR] [--lr_key_bug] --datasets ... --data_dir tfds --out results
--model: released weights (as `python -m smfsr_jax.sr --model`), converted once into the cache, evaluated as a bundle.

Watch mode: follow a training workdir and evaluate each finished checkpoint once, as it appears.
  python evaluate.py --watch runs/student --datasets paired_sr/drealsr --data_dir tfds --metrics psnr,ssim \
      --max_images 16 [--poll_seconds 60] [--stop_after_seconds N] [--once]

Scoring (all modes): images are read as 8-bit RGB with alpha dropped; full-reference metrics (psnr, ssim, lpips)
compare with the reference of the same name, no-reference ones (clipiqa, musiq, maniqa) read only the SR image.
Unreadable images are skipped, counted and named; means are over the evaluated images. Metric weights:
--<metric>_weights PATH, or --weights_dir DIR holding DIR/<metric> (see smfsr_jax/evaluation/metrics.py).

Directory mode pairs files by name (Python sorted() order); full-reference metrics need --hr_dir with the same
names and, pair by pair, the same image size. The sizes are read from the file headers before any scoring: pairs
of different sizes stop the run with a list of all of them, or, with --skip_mismatched, are skipped, counted and
named as unreadable images are. Outputs: --out (x.json) and x.csv, x.md, x.log beside it, laid out in
smfsr_jax/evaluation/results.py. On DRealSR's OSEDiff outputs, psnr,ssim give 27.9243 / 0.7835, as the log.

Checkpoint mode reads each --datasets set (split test; smfsr_jax/evaluation/runner.py) and, per seed, samples
image k with fold_in(PRNGKey(seed), k), k its index in file order (docs/design.md#noise-seeding), with the protocol
sampler (1 student step, AdaIN colour fix; --steps, --color_fix) and the records' captions (--nocaptions: the
NULL prompt). Full-reference metrics are scored only on sets with HR images. Outputs in --out:
  <dataset>/seed<s>/<LR stem>.png        SR images, 8-bit RGB, 4x the LR size
  <dataset>/seed<s>.json/.csv/.md/.log   that seed's scores, as in directory mode (plus dataset, seed, wall_s)
  table1.json/.md    the first seed's dataset means (Table 1)
  table3.json/.md    with several seeds: mean ± population std (ddof 0) of the per-seed dataset means
  table4.json/.md    with seed 1 and any of seeds 2…7: mean LPIPS-Alex(seed k, seed 1) over images, per k;
                     needs LPIPS weights (--lpips_weights or --weights_dir) even when lpips is not in --metrics
                     (--notable4 skips it); <dataset>/seed<k>_vs_seed1.* hold the per-image distances

Watch mode writes each step's evaluation to WORKDIR/eval/<step>/, its means to TensorBoard's "eval" run and to
WORKDIR/eval/metrics.jsonl; it stops with --once, after --stop_after_seconds, or once bundle/ exists and all is done.
Devices and processes (checkpoint and watch mode): --batch_size images per local device per SR call. Several hosts
run the same command with --num_processes N --process_id I --coordinator_address HOST:PORT (or --distributed):
each super-resolves its share, process 0 writes the results as one process would (smfsr_jax/evaluation/runner.py).
Compiled SR functions are kept in --cache_dir (default $SMFSR_JAX_CACHE or ~/.cache/smfsr_jax) as `sr` keeps them.
Every path may be a bucket URL (gs://bucket/path), mixed with local ones; each results file is written whole.
Before any metric network or model is loaded, every mode checks its flags, datasets, the weights of --metrics (all
missing ones named at once) and that its output directory (--out's, or WORKDIR/eval) can be created and written.
Exit status: 0; 2 for a problem to fix first (a bad path or value, missing weights, a bad checkpoint or dataset,
mismatched image names or sizes, an unwritable output directory), printed as one line; 1 when a write failed
part-way: the line names the file and what was written (directory mode prints the scores first). --debug shows
the traceback. Flag errors print absl's usage message, with status 1.
"""

from absl import app, flags

from smfsr_jax.core import cache, distributed, errors, files
from smfsr_jax.core import workdir as workdir_lib
from smfsr_jax.evaluation import directory, runner, tables, watch
from smfsr_jax.evaluation import results as results_lib
from smfsr_jax.evaluation.metrics import REGISTRY, build_metrics
from smfsr_jax.sampling import color
from smfsr_jax.sampling.settings import PROCESS_SIZE, SRSettings
from smfsr_jax.sr import parse_seeds
from smfsr_jax.training import inference
from smfsr_jax.weights import pretrained

DEFAULT_METRICS = ("psnr", "ssim", "lpips", "clipiqa", "musiq", "maniqa")
# Flags of one mode only; the benchmark flags belong to checkpoint and watch mode.
_BENCHMARK_FLAGS = ("datasets", "data_dir", "seeds", "steps", "color_fix", "captions", "max_images", "process_size",
                    "table4", "cache_dir") + tuple(name for name, *_ in distributed.FLAGS)
_MODE_FLAGS = {"sr_dir": ("hr_dir", "skip_mismatched"), "checkpoint": ("step",) + _BENCHMARK_FLAGS,
               "model": ("base", "null_embeddings", "lr_key_bug") + _BENCHMARK_FLAGS,
               "watch": ("poll_seconds", "stop_after_seconds", "once") + _BENCHMARK_FLAGS}


def _define_flags():
    flags.DEFINE_string("sr_dir", None, "directory mode: directory of SR images")
    flags.DEFINE_string("hr_dir", None, "directory mode: directory of reference images (full-reference metrics)")
    flags.DEFINE_bool("skip_mismatched", False, "directory mode: skip (and name) the SR images whose size differs "
                                                "from their reference's, instead of stopping before any scoring")
    flags.DEFINE_string("checkpoint", None, "checkpoint mode: model bundle or training workdir")
    flags.DEFINE_integer("step", None, "checkpoint mode with a workdir: the checkpoint step (default: the latest)")
    flags.DEFINE_string("watch", None, "watch mode: training workdir to follow")
    flags.DEFINE_string("model", None, "checkpoint mode with released weights: the transformer (smfsr_q, "
                                       "dit4sr_r1, ...) directory or Hub id, e.g. zw121/SMFSR/smfsr_q; needs --base")
    flags.DEFINE_string("base", None, "with --model: the Stable Diffusion 3.5 Medium directory or Hub id")
    flags.DEFINE_string("null_embeddings", None, "with --model: directory of DiT4SR's NULL_*.pt (default: found "
                                                 "beside --model, else encode(\"\") with --base's text encoders)")
    flags.DEFINE_string("cache_dir", None, "released weights' conversions (--model) and compiled functions "
                                           "(default $SMFSR_JAX_CACHE, else ~/.cache/smfsr_jax)")
    flags.DEFINE_bool("lr_key_bug", None, "with --model: double-normalised LR keys (default: false for dit4sr_r1, "
                                          "else true)")
    flags.mark_flags_as_mutual_exclusive(["sr_dir", "checkpoint", "model", "watch"], required=True)
    flags.DEFINE_list("metrics", list(DEFAULT_METRICS), f"comma-separated, from {', '.join(REGISTRY)}")
    flags.DEFINE_string("out", None, "directory mode: results JSON path (.csv, .md, .log beside it); "
                                     "checkpoint mode: output directory")
    flags.DEFINE_string("weights_dir", None, "directory holding one weights entry per metric, under its name")
    for spec in REGISTRY.values():
        if spec.needs_weights:
            flags.DEFINE_string(spec.weights_flag, None, f"{spec.name} weights: {spec.weights_help}")
    flags.DEFINE_integer("batch_size", 8, "images per device per SR call, and per metric call (same-size images)")
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
    flags.DEFINE_bool("debug", False, "show the traceback of the project's own errors (exit status 2 and 1)")
    distributed.define_flags()


def _check_mode_flags(FLAGS) -> str:
    mode = next(name for name in _MODE_FLAGS if FLAGS[name].value is not None)
    foreign = sorted({f for other, names in _MODE_FLAGS.items() if other != mode for f in names}
                     - set(_MODE_FLAGS[mode]))
    given = [f"--{name}" for name in foreign if FLAGS[name].present]
    if given:
        raise app.UsageError(f"--{mode} does not take {', '.join(given)}")
    if mode in ("sr_dir", "checkpoint", "model") and FLAGS.out is None:
        raise app.UsageError(f"--{mode} needs --out")
    if mode == "watch" and FLAGS.out is not None:
        raise app.UsageError(f"watch mode writes under WORKDIR/{workdir_lib.EVAL}; --out does not apply")
    if mode == "model" and FLAGS.base is None:
        raise app.UsageError("--model needs --base (the Stable Diffusion 3.5 Medium directory or Hub id)")
    if mode != "sr_dir" and not (FLAGS.datasets and FLAGS.data_dir):
        raise app.UsageError(f"--{mode} needs --datasets and --data_dir")
    for name, least in (("batch_size", 1), ("steps", 1), ("max_images", 1), ("process_size", 4),
                        ("poll_seconds", 0), ("stop_after_seconds", 0)):
        if FLAGS[name].value is not None and FLAGS[name].value < least:
            raise app.UsageError(f"--{name} must be >= {least}, got {FLAGS[name].value}")
    return mode


def _evaluate(FLAGS, mode: str):
    distributed.initialize(FLAGS.distributed, FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    weights_paths = {name: getattr(FLAGS, spec.weights_flag) for name, spec in REGISTRY.items()
                     if spec.needs_weights}
    # Checks that load no network first (datasets, the output directory, every missing weight), then the metric
    # networks, then the image pairs and sizes (directory mode) or the model.
    with errors.as_user_error():  # bad values and paths, as the libraries report them
        if mode == "sr_dir":
            results_lib.check_results_path(FLAGS.out)
            metrics = build_metrics(FLAGS.metrics, weights_paths, FLAGS.weights_dir)
            names, mismatched = directory.pair_images(FLAGS.sr_dir, FLAGS.hr_dir,
                                                      any(m.full_reference for m in metrics.values()),
                                                      FLAGS.skip_mismatched)
        else:
            seeds = parse_seeds(FLAGS.seeds)
            cache.enable_compilation_cache(FLAGS.cache_dir)
            benchmarks = [runner.BenchmarkSet(d, FLAGS.data_dir, FLAGS.max_images) for d in FLAGS.datasets]
            if mode == "watch":
                inference.read_config(FLAGS.watch)  # a training workdir, checked before writing in it
            files.check_writable(FLAGS.out if mode != "watch" else workdir_lib.eval_dir(FLAGS.watch))
            metrics = build_metrics(FLAGS.metrics, weights_paths, FLAGS.weights_dir)
            run = runner.BenchmarkRun(
                benchmarks=benchmarks, seeds=seeds, metrics=metrics,
                diversity_metric=(runner.diversity_metric(metrics, seeds, weights_paths, FLAGS.weights_dir)
                                  if FLAGS.table4 else None),
                settings=SRSettings(steps=FLAGS.steps, color_fix=FLAGS.color_fix, batch_size=FLAGS.batch_size,
                                    process_size=FLAGS.process_size),
                captions=FLAGS.captions)
            if mode == "checkpoint":
                bundle = runner.load_model(FLAGS.checkpoint, FLAGS.step)
            elif mode == "model":  # released weights: the bundle converted once into the cache
                bundle = runner.load_model(pretrained.load_or_convert(
                    FLAGS.model, FLAGS.base, null_embeddings=FLAGS.null_embeddings, lr_key_bug=FLAGS.lr_key_bug,
                    cache_dir=FLAGS.cache_dir))
    if mode in ("checkpoint", "model"):
        tables.print_tables(runner.evaluate_model(bundle, run, FLAGS.out), FLAGS.out)
    elif mode == "watch":
        steps = watch.watch(FLAGS.watch, run, poll_seconds=FLAGS.poll_seconds,
                            stop_after_seconds=FLAGS.stop_after_seconds, once=FLAGS.once)
        print(f"evaluated steps {steps or 'none'}; outputs in {workdir_lib.eval_dir(FLAGS.watch)}")
    if mode != "sr_dir":
        print(cache.describe_compilations())
    else:
        directory.score_and_write(FLAGS.sr_dir, FLAGS.hr_dir, metrics, FLAGS.batch_size, names, mismatched, FLAGS.out)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    FLAGS = flags.FLAGS
    mode = _check_mode_flags(FLAGS)
    return errors.run_cli(lambda: _evaluate(FLAGS, mode), debug=FLAGS.debug)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
