"""The layout of a training workdir, read by the training loop, checkpoint loading and the evaluator.

    WORKDIR/config.json      the run's config (the stage is rebuilt from it)
    WORKDIR/run.lock         held while a training run uses the workdir: {"host", "pid", "started"}
    WORKDIR/checkpoints/     orbax steps: train state + data-iterator state
    WORKDIR/metrics.jsonl    one JSON object per logged step (TensorBoard events beside it)
    WORKDIR/bundle/          the exported model, written at the end of the run
    WORKDIR/eval/            the evaluator's watch mode: per-step results and its TensorBoard events

WORKDIR may be a bucket URL (gs://...): every name below is joined through core/files.
"""

from smfsr_jax.core import files

CONFIG = "config.json"
LOCK = "run.lock"
CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
BUNDLE = "bundle"
EVAL = "eval"


def config_path(workdir: str) -> str:
    return files.join(workdir, CONFIG)


def lock_path(workdir: str) -> str:
    return files.join(workdir, LOCK)


def checkpoints_dir(workdir: str) -> str:
    return files.join(workdir, CHECKPOINTS)


def metrics_path(workdir: str) -> str:
    return files.join(workdir, METRICS)


def bundle_dir(workdir: str) -> str:
    return files.join(workdir, BUNDLE)


def eval_dir(workdir: str) -> str:
    return files.join(workdir, EVAL)


def is_workdir(path: str) -> bool:
    return files.is_file(config_path(path))
