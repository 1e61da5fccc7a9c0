r"""Experiment: one tiny teacher geometry, trained on the bundled photographs and judged as the demo judges it.

Trains configs/teacher_fm.py:tiny with any --config overrides into --workdir, then super-resolves the held-back
photographs with 1 and 16 Euler steps and reports PSNR (Y) and the token-grid block ratio (a mosaic is ~2,
photographs ~1; evaluation/artifacts.py), with the training time. The rows of docs/experiments.md ("the tiny
geometry") come from runs such as:

  python benchmarks/tiny_geometry.py --workdir runs/geometry/default
  python benchmarks/tiny_geometry.py --workdir runs/geometry/orthogonal_8px \
    --config.autoencoder.pixel_basis=orthogonal --config.model.patch_size=2 --config.model.num_heads=6 \
    --config.model.sample_size=16 --config.data.degradation.crop_size=64 --config.total_steps=400

Prints one JSON line.
"""

import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from smfsr_jax import demo  # noqa: E402
from smfsr_jax.data import build  # noqa: E402
from smfsr_jax.evaluation.artifacts import block_ratio  # noqa: E402
from smfsr_jax.evaluation.psnr_ssim import psnr  # noqa: E402
from smfsr_jax.sampling.runner import SRPipeline  # noqa: E402
from smfsr_jax.training import loop  # noqa: E402

STEPS = (1, 16)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    config, workdir = flags.FLAGS.config, os.path.abspath(flags.FLAGS.workdir)
    data_dir = os.path.join(workdir, "tfds")
    if not os.path.isdir(os.path.join(data_dir, "bundled")):
        build.build("bundled", data_dir)
    config.data.data_dir = data_dir
    start = time.perf_counter()
    loop.train(config, workdir)
    seconds = time.perf_counter() - start
    _, lrs, hrs = demo.holdout_pairs(data_dir)
    tile = config.data.degradation.crop_size // config.autoencoder.downscale
    sr_pipeline = SRPipeline.from_checkpoint(os.path.join(workdir, "bundle"), process_size=4 * lrs[0].shape[0],
                                             tile_size=tile, tile_overlap=tile // 2, batch_size=len(lrs))
    token = demo.token_pixels(sr_pipeline)
    rows = {}
    for steps in STEPS:
        sr = np.stack(sr_pipeline(list(lrs), seed=0, steps=steps, guidance_scale=1.0))
        rows[steps] = {"psnr": round(float(psnr(sr, np.stack(hrs)).mean()), 3), "block_ratio": round(block_ratio(sr, token), 3)}
    print(json.dumps({"name": "tiny_geometry", "value": rows[STEPS[-1]]["block_ratio"],
                      "unit": f"block ratio ({STEPS[-1]}-step teacher)", "train_seconds": round(seconds, 1),
                      "token_pixels": token, "pixel_basis": config.autoencoder.pixel_basis,
                      "steps": config.total_steps, "batch_size": config.batch_size,
                      "crop": config.data.degradation.crop_size, "by_steps": rows}))


if __name__ == "__main__":
    config_flags.DEFINE_config_file("config", os.path.join(os.path.dirname(__file__), "..", "configs",
                                                           "teacher_fm.py") + ":tiny", "Teacher config.",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "Run directory.")
    flags.mark_flags_as_required(["workdir"])
    app.run(main)
