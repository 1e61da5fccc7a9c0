"""Training-pipeline throughput: degraded HR crops per second (Real-ESRGAN second order + bicubic x4 LR).

    python benchmarks/data_pipeline.py                      # 512 crops, 2 worker processes
    python benchmarks/data_pipeline.py --workers 0 --crop_size 128

Reads the `bundled` photographs (built into a temporary folder unless --data_dir holds them) through
the real train pipeline: decode, crop, flip, degradation, LR upsampling, batching and worker IPC.
The last line printed is a JSON object; `value` is crops per second (wall clock) after the warm-up
batches. On a shared machine that figure depends on the other load, so the object also carries the
CPU time the pipeline used per crop (main process + workers) and `idle_crops_per_s` = cores / that.
"""

import argparse
import json
import multiprocessing
import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import grain  # noqa: E402

from smfsr_jax.data import build, degradation, pipeline  # noqa: E402


def _cpu_seconds() -> float:
    """CPU time of this process and its live children (the grain workers), from /proc."""
    total = time.process_time()
    ticks = os.sysconf("SC_CLK_TCK")
    for child in multiprocessing.active_children():
        with open(f"/proc/{child.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    return total


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--crop_size", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batches", type=int, default=24, help="timed batches")
    parser.add_argument("--warmup", type=int, default=4, help="untimed batches (worker start-up)")
    parser.add_argument("--data_dir", default=None, help="TFDS data_dir with `bundled` (built when absent)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        data_dir = args.data_dir or scratch
        build.build("bundled", data_dir)
        config = degradation.default_config()
        config.crop_size = args.crop_size
        dataset = pipeline.train_pipeline(
            pipeline.open_source("bundled", "train", data_dir), batch_size=args.batch_size, seed=0,
            degradation_config=config, shard_options=grain.sharding.NoSharding(), worker_count=args.workers)
        iterator = iter(dataset)
        for _ in range(args.warmup):
            next(iterator)
        start, cpu_start = time.perf_counter(), _cpu_seconds()
        for _ in range(args.batches):
            next(iterator)
        seconds, cpu_seconds = time.perf_counter() - start, _cpu_seconds() - cpu_start
        if hasattr(iterator, "close"):
            iterator.close()
    crops = args.batches * args.batch_size
    print(json.dumps({"name": "data_pipeline_train_crops", "value": round(crops / seconds, 2), "unit": "crops/s",
                      "crop_size": args.crop_size, "batch_size": args.batch_size, "workers": args.workers,
                      "cpu_count": os.cpu_count(), "dataset": "bundled/train", "timed_crops": crops,
                      "seconds": round(seconds, 3), "cpu_ms_per_crop": round(1000 * cpu_seconds / crops, 1),
                      "idle_crops_per_s": round(os.cpu_count() * crops / cpu_seconds, 2),
                      "load_average": os.getloadavg()[0]}))


if __name__ == "__main__":
    main()
