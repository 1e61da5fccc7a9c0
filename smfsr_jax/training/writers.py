"""Metric writers: TensorBoard (clu) plus a JSON-lines file, on process 0 only."""

import json
import os

import jax
import numpy as np
from clu import metric_writers

from smfsr_jax.core import workdir as workdir_lib


class JsonlWriter(metric_writers.MetricWriter):
    """One strict-JSON object per write_scalars call: {"step": n, name: value, ...}; a NaN or Inf value is
    written as null and its name listed under "nonfinite"."""

    def __init__(self, path: str):
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def write_scalars(self, step, scalars):
        values = {k: float(np.asarray(v)) for k, v in scalars.items()}
        record = {"step": int(step), **{k: v if np.isfinite(v) else None for k, v in values.items()}}
        nonfinite = sorted(k for k, v in values.items() if not np.isfinite(v))
        if nonfinite:
            record["nonfinite"] = nonfinite
        with open(self.path, "a") as f:
            f.write(json.dumps(record, allow_nan=False) + "\n")

    def write_summaries(self, step, values, metadata=None):
        pass

    def write_images(self, step, images):
        pass

    def write_videos(self, step, videos):
        pass

    def write_audios(self, step, audios, *, sample_rate):
        pass

    def write_texts(self, step, texts):
        pass

    def write_histograms(self, step, arrays, num_buckets=None):
        pass

    def write_hparams(self, hparams):
        pass

    def flush(self):
        pass

    def close(self):
        pass


def make_writer(workdir: str) -> metric_writers.MetricWriter:
    """TensorBoard events in WORKDIR and metrics in WORKDIR/metrics.jsonl (no-op writers off process 0)."""
    just_logging = jax.process_index() > 0
    tensorboard = metric_writers.create_default_writer(workdir, just_logging=just_logging, asynchronous=True)
    if just_logging:
        return tensorboard
    return metric_writers.MultiWriter([tensorboard, JsonlWriter(workdir_lib.metrics_path(workdir))])


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
