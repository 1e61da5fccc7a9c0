"""Metric writers: TensorBoard event files and a JSON-lines file, on process 0 only, local or in a bucket.

Both write through core/files, so a gs:// workdir gets its events and metrics.jsonl like a local one (clu's
TensorBoard writer goes through TensorFlow's file system, which reaches no emulator and is not needed here).
Locally each write is appended at once; in a bucket, where an append is a compose request, writes are
gathered and appended every FLUSH_SECONDS and at every flush() (the loop flushes at each checkpoint).
"""

import io
import json
import os
import socket
import time

import jax
import numpy as np
from clu import metric_writers
from PIL import Image
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.record_writer import RecordWriter

from smfsr_jax.core import files
from smfsr_jax.core import workdir as workdir_lib

FLUSH_SECONDS = 30.0


class _AppendBuffer:
    """Bytes bound for the end of one file: appended at once locally, every FLUSH_SECONDS in a bucket."""

    def __init__(self, path: str):
        self.path, self.pending, self.flushed = path, io.BytesIO(), time.monotonic()
        self.delay = FLUSH_SECONDS if files.is_remote(path) else 0.0

    def write(self, data: bytes):
        self.pending.write(data)
        if time.monotonic() - self.flushed >= self.delay:
            self.flush()

    def flush(self):
        data = self.pending.getvalue()
        if data:
            files.append_bytes(self.path, data)
            self.pending = io.BytesIO()
        self.flushed = time.monotonic()


class _Limited(metric_writers.MetricWriter):
    """Kinds of summary the project does not write raise instead of vanishing."""

    def _unsupported(self, kind: str):
        raise NotImplementedError(f"{type(self).__name__} does not write {kind}")

    def write_summaries(self, step, values, metadata=None):
        self._unsupported("summaries")

    def write_images(self, step, images):
        self._unsupported("images")

    def write_videos(self, step, videos):
        self._unsupported("videos")

    def write_audios(self, step, audios, *, sample_rate):
        self._unsupported("audio")

    def write_texts(self, step, texts):
        self._unsupported("texts")

    def write_histograms(self, step, arrays, num_buckets=None):
        self._unsupported("histograms")

    def write_hparams(self, hparams):
        self._unsupported("hparams")


class JsonlWriter(_Limited):
    """One strict-JSON object per write_scalars call: {"step": n, name: value, ...}; a NaN or Inf value is
    written as null and its name listed under "nonfinite"."""

    def __init__(self, path: str):
        self.output = _AppendBuffer(files.absolute(path))

    def write_scalars(self, step, scalars):
        values = {k: float(np.asarray(v)) for k, v in scalars.items()}
        record = {"step": int(step), **{k: v if np.isfinite(v) else None for k, v in values.items()}}
        nonfinite = sorted(k for k, v in values.items() if not np.isfinite(v))
        if nonfinite:
            record["nonfinite"] = nonfinite
        self.output.write((json.dumps(record, allow_nan=False) + "\n").encode())

    def write_images(self, step, images):
        pass  # images go to TensorBoard only

    def flush(self):
        self.output.flush()

    def close(self):
        self.flush()


class EventsWriter(_Limited):
    """A TensorBoard event file in `logdir` (scalars and images), written with TensorBoard's record format."""

    def __init__(self, logdir: str):
        name = f"events.out.tfevents.{time.time():.6f}.{socket.gethostname()}.{os.getpid()}.smfsr"
        self.output = _AppendBuffer(files.join(logdir, name))
        self.records = RecordWriter(self.output)
        self._write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

    def _write(self, event: event_pb2.Event):
        self.records.write(event.SerializeToString())

    def _summary(self, step: int, values: list):
        self._write(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary_pb2.Summary(value=values)))

    def write_scalars(self, step, scalars):
        self._summary(step, [summary_pb2.Summary.Value(tag=k, simple_value=float(np.asarray(v)))
                             for k, v in scalars.items()])

    def write_images(self, step, images):
        """`images`: name -> (N, H, W, C) or (H, W, C) arrays, uint8 or floats in [0, 1]; one tag per image."""
        values = []
        for name, batch in images.items():
            batch = np.asarray(batch)
            batch = batch[None] if batch.ndim == 3 else batch
            if batch.dtype != np.uint8:
                batch = np.round(np.clip(batch, 0.0, 1.0) * 255.0).astype(np.uint8)
            for i, image in enumerate(batch):
                png = io.BytesIO()
                Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(png, format="PNG")
                tag = name if len(batch) == 1 else f"{name}/image/{i}"
                values.append(summary_pb2.Summary.Value(tag=tag, image=summary_pb2.Summary.Image(
                    height=image.shape[0], width=image.shape[1], colorspace=image.shape[2],
                    encoded_image_string=png.getvalue())))
        self._summary(step, values)

    def flush(self):
        self.output.flush()

    def close(self):
        self.flush()


def make_writer(logdir: str, metrics_path: str | None = None) -> metric_writers.MetricWriter:
    """Process 0: log lines, TensorBoard events in `logdir` and, given `metrics_path`, metrics.jsonl, written on
    a background thread; other processes: log lines only."""
    if jax.process_index() > 0:
        return metric_writers.LoggingWriter()
    writers = [metric_writers.LoggingWriter(), EventsWriter(logdir)]
    if metrics_path is not None:
        writers.append(JsonlWriter(metrics_path))
    return metric_writers.AsyncMultiWriter(writers)


def make_run_writer(workdir: str) -> metric_writers.MetricWriter:
    """The training loop's writer: events in WORKDIR, metrics in WORKDIR/metrics.jsonl."""
    return make_writer(workdir, workdir_lib.metrics_path(workdir))


def read_jsonl(path: str) -> list[dict]:
    return [json.loads(line) for line in files.read_text(path).splitlines() if line.strip()]
