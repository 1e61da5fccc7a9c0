"""Experiment (paper Table 7 in miniature): the one-step ISC student against the multi-step teacher.

On the tiny configs trained on the bundled photographs (the `make demo` runs; trained here when absent), the
held-back photographs are cut into random 128² crops and degraded (Real-ESRGAN second order, fixed seeds).
Rows: bicubic x4, the teacher with 1/2/4/50 Euler steps on the SD3 grid (no CFG), and for every ISC time
sampler in --samplers a stage-1 student from the demo's teacher (the demo's own student for the default
sampler, the others trained here under WORKDIR/table7/) with 1/2/4 cosine-grid steps. Metrics: PSNR and SSIM
on Y (pyiqa definitions), the token-grid block ratio and the detail ratio (fine detail against the HR,
evaluation/artifacts.py: PSNR favours the blurry mean, so it alone cannot show what more steps add); LPIPS
joins when its weights are given (--lpips_weights, a converted `python -m smfsr_jax.convert lpips` directory).

  python benchmarks/isc_table7.py --workdir workdirs/demo [--crops 16] [--samplers default,algorithm1]

Prints a Markdown table (the one recorded in docs/experiments.md) and, last, one JSON line.
"""

import argparse
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import numpy as np  # noqa: E402

from configs import student_isc  # noqa: E402
from smfsr_jax import demo  # noqa: E402
from smfsr_jax.data import degradation, images, pipeline  # noqa: E402
from smfsr_jax.evaluation.artifacts import block_ratio, detail_ratio  # noqa: E402
from smfsr_jax.evaluation.psnr_ssim import psnr, ssim  # noqa: E402
from smfsr_jax.objectives import isc  # noqa: E402

CROP = 128
TEACHER_STEPS, STUDENT_STEPS = (1, 2, 4, 50), (1, 2, 4)
# ISC time samplers (isc.isc_loss keywords); "default" is the configs' (the demo's student).
SAMPLERS = {
    "default": dict(isc.DEFAULT_OPTIONS),
    "algorithm1": dict(time_sampler="logit_normal", anchor_prob=0.0, anchor="interval", boundary_time="max"),
    "algorithm1_independent_boundary": dict(time_sampler="logit_normal", anchor_prob=0.0, anchor="interval",
                                            boundary_time="independent"),
    "sorted_uniform": dict(time_sampler="uniform", anchor_prob=0.0, anchor="interval", boundary_time="max"),
    "uniform_start_anchors": dict(time_sampler="uniform", anchor_prob=0.25, anchor="start",
                                  boundary_time="independent"),
}


def holdout_crops(data_dir: str, count: int, seed: int = 1234):
    """`count` (LR, HR) pairs: random crops of the held-back photographs, degraded with fixed seeds."""
    config = degradation.default_config()
    config.crop_size = CROP
    source = pipeline.open_source("bundled", "holdout", data_dir)
    photos = [images.decode_rgb8(source[i]["hr"]) for i in range(len(source))]
    lrs, hrs = [], []
    for k in range(count):
        rng = np.random.default_rng([seed, k])
        photo = photos[k % len(photos)]
        top, left = rng.integers(photo.shape[0] - CROP + 1), rng.integers(photo.shape[1] - CROP + 1)
        hr = np.ascontiguousarray(photo[top:top + CROP, left:left + CROP])
        _, lr = degradation.degrade(hr.astype(np.float32) / 255.0, rng, config)
        lrs.append(degradation.to_uint8(lr))
        hrs.append(hr)
    return lrs, np.stack(hrs)


def student_bundle(workdir: str, sampler: str) -> str:
    """The demo's student for the default sampler; otherwise one trained here from the demo's teacher."""
    if sampler == "default":
        return os.path.join(workdir, "student_isc", "bundle")
    config = student_isc.get_config("tiny")
    config.isc.update(SAMPLERS[sampler])
    return demo.train_config(config, os.path.join(workdir, "table7", sampler), os.path.join(workdir, "tfds"),
                             teacher=os.path.join(workdir, "teacher_fm", "bundle"))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="workdirs/demo")
    parser.add_argument("--crops", type=int, default=16)
    parser.add_argument("--samplers", default="default,algorithm1", help=f"comma-separated, of {sorted(SAMPLERS)}")
    parser.add_argument("--lpips_weights", default=None)
    args = parser.parse_args()
    samplers = args.samplers.split(",")
    unknown = sorted(set(samplers) - set(SAMPLERS))
    if unknown:
        parser.error(f"unknown samplers {unknown}; expected some of {sorted(SAMPLERS)}")
    workdir = os.path.abspath(args.workdir)
    teacher_dir = os.path.join(workdir, "teacher_fm", "bundle")
    if not (os.path.isdir(teacher_dir) and os.path.isdir(os.path.join(workdir, "student_isc", "bundle"))):
        demo.run(workdir)
    lrs, hrs = holdout_crops(os.path.join(workdir, "tfds"), args.crops)
    lpips = None
    if args.lpips_weights:
        from smfsr_jax.evaluation.metrics import load_lpips_alex
        lpips = load_lpips_alex(args.lpips_weights)

    teacher = demo.tiny_pipeline(teacher_dir, CROP // 4, batch_size=8)
    token = demo.token_pixels(teacher)
    rows = [("bicubic x4", "-", np.stack([demo.bicubic_x4(lr) for lr in lrs]))]
    rows += [("teacher (Euler)", n, np.stack(teacher(lrs, seed=0, steps=n, guidance_scale=1.0))) for n in TEACHER_STEPS]
    for sampler in samplers:
        student = demo.tiny_pipeline(student_bundle(workdir, sampler), CROP // 4, batch_size=8)
        rows += [(f"student, {sampler} times", n, np.stack(student(lrs, seed=0, steps=n))) for n in STUDENT_STEPS]

    header = "| model | steps | PSNR | SSIM | block ratio | detail ratio |" + (" LPIPS |" if lpips else "")
    lines = [header, "|---|---|---|---|---|---|" + ("---|" if lpips else "")]
    results = []
    for name, steps, sr in rows:
        entry = {"model": name, "steps": steps, "psnr": float(psnr(sr, hrs).mean()), "ssim": float(ssim(sr, hrs).mean()),
                 "block_ratio": block_ratio(sr, token), "detail_ratio": detail_ratio(sr, hrs)}
        if lpips:
            entry["lpips"] = float(np.mean(lpips(sr, hrs)))
        results.append(entry)
        lines.append(f"| {name} | {steps} | {entry['psnr']:.2f} | {entry['ssim']:.4f} | {entry['block_ratio']:.2f} | "
                     f"{entry['detail_ratio']:.2f} |"
                     + (f" {entry['lpips']:.4f} |" if lpips else ""))
    print("\n".join(lines))
    print(f"HR block ratio {block_ratio(hrs, token):.2f} ({token}-pixel tokens)")
    student_1 = next(r for r in results if r["model"].startswith("student") and r["steps"] == 1)
    teacher_50 = next(r for r in results if r["model"].startswith("teacher") and r["steps"] == 50)
    print(json.dumps({"name": "isc_table7_tiny", "value": round(student_1["psnr"], 3),
                      "unit": f"dB PSNR (1-step student, {samplers[0]} times)",
                      "teacher_50_step_psnr": round(teacher_50["psnr"], 3), "crops": args.crops, "crop": CROP,
                      "samplers": samplers, "rows": results}))


if __name__ == "__main__":
    main()
