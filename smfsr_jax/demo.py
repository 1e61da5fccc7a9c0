"""`make demo`: the embedded default, end to end on CPU with no pretrained weights.

1. builds the `bundled` dataset (photographs shipped in scikit-image) into WORKDIR/tfds;
2. trains the tiny teacher (`teacher_fm`, stage 0: flow matching), the tiny student from it (`student_isc`,
   stage 1: ISC) and refines the student (`student_gan`, stage 2: ISC + Rec + VSD + adversarial), each in
   WORKDIR/<stage>;
3. super-resolves the held-back photographs (never trained on; synthetic LR from the same degradation)
   with bicubic x4, the teacher (one and 16 Euler steps), the stage-1 student (one and four steps) and the
   one-step stage-2 student, writes the images and prints, per method, PSNR (Y channel, as the benchmarks
   report it), the token-grid block ratio (evaluation/artifacts.py: ~1 for photographs, 2 for a mosaic) and
   the detail ratio (fine detail over the HR's: below 1 is blur, far above 1 grain), so a newcomer sees at
   once whether training worked and whether one step matches many.

Re-running continues: finished stages are resumed from their last checkpoint (nothing left to do).

  python -m smfsr_jax.demo --workdir workdirs/demo
"""

import argparse
import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import logging  # noqa: E402
from PIL import Image  # noqa: E402

from configs import base, student_gan, student_isc, teacher_fm  # noqa: E402
from smfsr_jax.core import workdir as workdir_lib  # noqa: E402
from smfsr_jax.data import build, pipeline  # noqa: E402
from smfsr_jax.evaluation.artifacts import block_ratio, detail_ratio  # noqa: E402
from smfsr_jax.evaluation.psnr_ssim import psnr  # noqa: E402
from smfsr_jax.sampling.runner import SRPipeline  # noqa: E402
from smfsr_jax.training import loop  # noqa: E402
from smfsr_jax.weights import bundle as bundle_lib  # noqa: E402

STAGES = ("teacher_fm", "student_isc", "student_gan")  # the order they train in
HOLDOUT_CROP = 128  # held-back HR crops; LR 32 x 32
TEACHER_STEPS = 16
STUDENT_STEPS = 4


def holdout_pairs(data_dir: str, crop: int = HOLDOUT_CROP):
    """(file names, LR uint8, HR uint8) of the held-back photographs, degraded deterministically."""
    return pipeline.eval_pairs("bundled", "holdout", data_dir, crop)


def bicubic_x4(lr: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(lr).resize((lr.shape[1] * 4, lr.shape[0] * 4), Image.BICUBIC))


def tiny_pipeline(bundle_dir: str, lr_side: int, batch_size: int) -> SRPipeline:
    """SR of `lr_side` LR images in latent tiles of the training crop's size (as SMFSR tiles at its 512
    training size), without the protocol's upscaling of small inputs."""
    loaded = bundle_lib.load_bundle(bundle_dir)
    tile = base.TINY_CROP // loaded.autoencoder_config.downscale
    return SRPipeline.from_bundle(loaded, process_size=4 * lr_side, tile_size=tile, tile_overlap=tile // 2,
                                  batch_size=batch_size)


def token_pixels(sr: SRPipeline) -> int:
    """Image pixels per transformer token along a side: the grid `block_ratio` looks at."""
    return sr.model.autoencoder_config.downscale * sr.model.transformer_config.patch_size


def train_stage(module, workdir: str, data_dir: str, steps: dict, seed: int = 0, **init) -> str:
    """Train (or resume) one tiny stage in WORKDIR/<stage>; returns its bundle directory."""
    config = module.get_config("tiny")
    config.seed = seed
    return train_config(config, os.path.join(workdir, config.stage), data_dir, steps.get(config.stage), **init)


def train_config(config, workdir: str, data_dir: str, steps: int | None = None, **init) -> str:
    """Train (or resume) a tiny stage config on the bundled data; `init` names its input bundles."""
    config.data.data_dir = data_dir
    config.total_steps = steps or config.total_steps
    for key, path in init.items():
        config.init[key] = path
    print(f"training {config.stage} ({config.total_steps} steps) in {workdir}", flush=True)
    loop.train(config, workdir)
    return workdir_lib.bundle_dir(workdir)


def run(workdir: str, steps: dict | None = None, seed: int = 0) -> dict:
    """All three tiny stages, then SR of the held-back photographs; `steps` overrides {stage: total_steps},
    `seed` is every stage's training seed (the data order and initialisation)."""
    steps = steps or {}
    workdir = os.path.abspath(workdir)
    data_dir = os.path.join(workdir, "tfds")
    if not os.path.isdir(os.path.join(data_dir, "bundled")):
        build.build("bundled", data_dir)
    teacher = train_stage(teacher_fm, workdir, data_dir, steps, seed)
    student = train_stage(student_isc, workdir, data_dir, steps, seed, teacher=teacher)
    gan = train_stage(student_gan, workdir, data_dir, steps, seed, teacher=teacher, student=student)

    names, lrs, hrs = holdout_pairs(data_dir)
    pipelines = {stage: tiny_pipeline(path, lrs[0].shape[0], len(lrs))
                 for stage, path in (("teacher_fm", teacher), ("student_isc", student), ("student_gan", gan))}
    runs = {(stage, n): f"{stage}_{n}step" for stage, n in (("teacher_fm", 1), ("teacher_fm", TEACHER_STEPS),
                                                            ("student_isc", 1), ("student_isc", STUDENT_STEPS),
                                                            ("student_gan", 1))}
    outputs = {"bicubic": [bicubic_x4(lr) for lr in lrs]}
    for (stage, n), method in runs.items():
        call = {"guidance_scale": 1.0} if stage == "teacher_fm" else {}
        outputs[method] = pipelines[stage](list(lrs), seed=0, steps=n, **call)
    token = token_pixels(pipelines["teacher_fm"])
    out_dir = os.path.join(workdir, "outputs")
    os.makedirs(out_dir, exist_ok=True)
    report = {"token_pixels": token, "hr_block_ratio": round(block_ratio(np.stack(hrs), token), 3), "methods": {}}
    for method, images in outputs.items():
        scores = psnr(np.stack(images), np.stack(hrs))
        report["methods"][method] = {"psnr": {name: round(float(s), 3) for name, s in zip(names, scores)},
                                     "psnr_mean": round(float(scores.mean()), 3),
                                     "block_ratio": round(block_ratio(np.stack(images), token), 3),
                                     "detail_ratio": round(detail_ratio(np.stack(images), np.stack(hrs)), 3)}
    shown = ("bicubic", f"teacher_fm_{TEACHER_STEPS}step", "student_isc_1step", "student_gan_1step")
    for i, name in enumerate(names):
        row = [outputs[m][i] for m in shown] + [hrs[i]]
        Image.fromarray(np.concatenate(row, axis=1)).save(os.path.join(out_dir, f"{name}_comparison.png"))
        Image.fromarray(lrs[i]).save(os.path.join(out_dir, f"{name}_lr.png"))
        for method, images in outputs.items():
            Image.fromarray(images[i]).save(os.path.join(out_dir, f"{name}_{method}.png"))
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    return {"outputs": out_dir, "report": report}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="workdirs/demo")
    parser.add_argument("--seed", type=int, default=0, help="training seed of every stage (use a fresh workdir)")
    for stage in STAGES:
        parser.add_argument(f"--{stage}_steps", type=int, default=None, help=f"default: configs/{stage}.py:tiny")
    args = parser.parse_args()
    logging.set_verbosity(logging.WARNING)
    jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.abspath(args.workdir), "jax_cache"))
    result = run(args.workdir, {s: getattr(args, f"{s}_steps") for s in STAGES}, args.seed)
    report = result["report"]
    print(f"\nHeld-back photographs, x4 from synthetic real-world LR. PSNR: dB on Y. Block ratio: gradients across "
          f"the {report['token_pixels']}-pixel token grid over those inside it (HR {report['hr_block_ratio']:.2f}; "
          "a mosaic is ~2). Detail ratio: fine detail (mean |Laplacian|) over the HR's (below 1 blur, above 1 grain).")
    for method, scores in report["methods"].items():
        per_image = "  ".join(f"{k} {v:.2f}" for k, v in scores["psnr"].items())
        print(f"  {method:>17}: PSNR {scores['psnr_mean']:.2f} ({per_image})  block ratio {scores['block_ratio']:.2f}  "
              f"detail ratio {scores['detail_ratio']:.2f}")
    methods = report["methods"]
    teacher_many = methods[f"teacher_fm_{TEACHER_STEPS}step"]["psnr_mean"]
    print(f"\nOne step vs many: student_isc 1 step {methods['student_isc_1step']['psnr_mean']:.2f} dB, "
          f"{STUDENT_STEPS} steps {methods[f'student_isc_{STUDENT_STEPS}step']['psnr_mean']:.2f} dB; teacher_fm "
          f"1 step {methods['teacher_fm_1step']['psnr_mean']:.2f} dB, {TEACHER_STEPS} steps {teacher_many:.2f} dB.")
    print(f"Images in {result['outputs']}: <name>_comparison.png shows bicubic | teacher ({TEACHER_STEPS} steps) | "
          "student_isc | student_gan | HR (one step each); every output is also saved alone.")


if __name__ == "__main__":
    main()
