"""Experiment: the stage-2 discriminator on the native output against a 224² downscale, on the tiny configs.

From the `make demo` teacher and stage-1 student (trained when absent), the tiny GAN stage is trained once per
`disc.resolution` (the native run is the demo's own; the others go under WORKDIR/gan_resolution/) and
evaluated on the held-back photographs in one step: PSNR on Y, the token-grid block ratio and the detail ratio
(evaluation/artifacts.py).

  python benchmarks/gan_disc_resolution.py --workdir workdirs/demo [--resolutions native,224]

Prints a Markdown table (recorded in docs/experiments.md) and, last, one JSON line.
"""

import argparse
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import numpy as np  # noqa: E402

from configs import student_gan  # noqa: E402
from smfsr_jax import demo  # noqa: E402
from smfsr_jax.evaluation.artifacts import block_ratio, detail_ratio  # noqa: E402
from smfsr_jax.evaluation.psnr_ssim import psnr  # noqa: E402


def gan_bundle(workdir: str, resolution: str) -> str:
    if resolution == student_gan.get_config("tiny").disc.resolution:
        return os.path.join(workdir, "student_gan", "bundle")
    config = student_gan.get_config("tiny")
    config.disc.resolution = resolution
    return demo.train_config(config, os.path.join(workdir, "gan_resolution", resolution), os.path.join(workdir, "tfds"),
                             teacher=os.path.join(workdir, "teacher_fm", "bundle"),
                             student=os.path.join(workdir, "student_isc", "bundle"))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="workdirs/demo")
    parser.add_argument("--resolutions", default="native,224")
    args = parser.parse_args()
    workdir = os.path.abspath(args.workdir)
    if not os.path.isdir(os.path.join(workdir, "student_gan", "bundle")):
        demo.run(workdir)
    names, lrs, hrs = demo.holdout_pairs(os.path.join(workdir, "tfds"))
    hrs = np.stack(hrs)
    lines = ["| discriminator input | PSNR | block ratio | detail ratio |", "|---|---|---|---|"]
    results = []
    for resolution in args.resolutions.split(","):
        sr_pipeline = demo.tiny_pipeline(gan_bundle(workdir, resolution), lrs[0].shape[0], len(lrs))
        sr = np.stack(sr_pipeline(list(lrs), seed=0, steps=1))
        entry = {"resolution": resolution, "psnr": float(psnr(sr, hrs).mean()),
                 "block_ratio": block_ratio(sr, demo.token_pixels(sr_pipeline)), "detail_ratio": detail_ratio(sr, hrs)}
        results.append(entry)
        lines.append(f"| {resolution} | {entry['psnr']:.2f} | {entry['block_ratio']:.2f} | {entry['detail_ratio']:.2f} |")
    print("\n".join(lines))
    print(json.dumps({"name": "gan_disc_resolution_tiny", "value": round(results[0]["psnr"], 3),
                      "unit": f"dB PSNR (1-step GAN student, disc {results[0]['resolution']})", "images": names,
                      "rows": results}))


if __name__ == "__main__":
    main()
