"""Stage 3 in miniature: reward fine-tuning of the demo's one-step student, both methods, before and after.

Trains (or resumes) the demo's stages 0-2 in WORKDIR when their bundles are missing, then `student_reward` (tiny config:
the analytic LR-consistency reward) from the stage-2 bundle, once with DiffusionNFT and once with direct reward
back-propagation, in WORKDIR/student_reward/<method>. Scores the stage-2 bundle and both stage-3 bundles on the
held-back photographs exactly as `make demo` super-resolves them (128-pixel HR, LR 32, latent tiles of the
training size), with K seeds per image:
    reward     the configured rewards' weighted sum on the saved 8-bit outputs (higher is better)
    psnr       dB on Y against HR (the evaluator's PSNR), mean over images and seeds
    diversity  per-pixel standard deviation across the K seeds, 8-bit levels, mean over pixels and images

  python benchmarks/reward_tiny.py --workdir workdirs/demo [--steps 100] [--seeds 4]
  python benchmarks/reward_tiny.py --methods nft --set optimizer.lr=3e-4 --set reward.p_t_one=1.0 --tag lr3e-4_t1

`--set FIELD=VALUE` overrides the stage-3 config (a Python literal); a run goes to
WORKDIR/student_reward/<method>[_<tag>] and resumes there when re-run.

Last line: one JSON object {"name", "value" (the NFT reward gain), "unit", "nft": {...}, "direct": {...},
"config": {...}}.
"""

import argparse
import ast
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import logging  # noqa: E402

from configs import student_gan, student_isc, student_reward, teacher_fm  # noqa: E402
from smfsr_jax import demo  # noqa: E402
from smfsr_jax.core import workdir as workdir_lib  # noqa: E402
from smfsr_jax.data import build  # noqa: E402
from smfsr_jax.evaluation.psnr_ssim import psnr  # noqa: E402
from smfsr_jax.objectives import rewards  # noqa: E402
from smfsr_jax.weights import bundle as bundle_lib  # noqa: E402

METHODS = ("nft", "direct")


def score(bundle_dir: str, lrs, hrs, seeds: int, reward_weights) -> dict:
    """Held-out reward, PSNR and cross-seed diversity of a bundle (module docstring)."""
    sr = demo.tiny_pipeline(bundle_dir, lrs[0].shape[0], len(lrs))
    outputs = np.stack([np.stack(sr(list(lrs), seed=seed)) for seed in range(seeds)], axis=1)  # (N, K, H, W, 3)
    flat = outputs.reshape(-1, *outputs.shape[2:])
    batch = {"hr": np.repeat(np.stack(hrs), seeds, axis=0), "lr": np.repeat(np.stack(lrs), seeds, axis=0)}
    fns = {name: rewards.REWARDS[name].make(None) for name, _ in reward_weights}
    signed = flat.astype(np.float32) / 127.5 - 1
    total = sum(weight * np.asarray(fns[name](None, signed, batch)) for name, weight in reward_weights)
    return {"reward": round(float(np.mean(total)), 5),
            "psnr": round(float(np.mean(psnr(flat, batch["hr"]))), 3),
            "diversity": round(float(outputs.astype(np.float64).std(axis=1).mean()), 3)}


def demo_stage(module, workdir: str, data_dir: str, **init) -> str:
    """The bundle of the demo's stage in WORKDIR/<stage>, trained (or resumed) first when it has none."""
    exported = workdir_lib.bundle_dir(os.path.join(workdir, module.get_config("tiny").stage))
    if os.path.isfile(os.path.join(exported, bundle_lib.BUNDLE_FILE)):
        return exported
    return demo.train_stage(module, workdir, data_dir, {}, **init)


def stage_config(overrides: dict):
    config = student_reward.get_config("tiny")
    config.update_from_flattened_dict(overrides)
    return config


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="workdirs/demo")
    parser.add_argument("--steps", type=int, default=None, help="stage-3 steps (default: the tiny config's)")
    parser.add_argument("--seeds", type=int, default=4, help="seeds per held-back image when scoring")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated: nft, direct")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="stage-3 config override, e.g. reward.p_t_one=1.0 (repeatable)")
    parser.add_argument("--tag", default="", help="suffix of the stage-3 workdirs")
    args = parser.parse_args()
    overrides = {}
    for item in args.set:
        field, _, value = item.partition("=")
        overrides[field] = ast.literal_eval(value)
    logging.set_verbosity(logging.WARNING)
    workdir = os.path.abspath(args.workdir)
    jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, "jax_cache"))
    data_dir = os.path.join(workdir, "tfds")
    if not os.path.isdir(os.path.join(data_dir, "bundled")):
        build.build("bundled", data_dir)
    teacher = demo_stage(teacher_fm, workdir, data_dir)
    student = demo_stage(student_isc, workdir, data_dir, teacher=teacher)
    gan = demo_stage(student_gan, workdir, data_dir, teacher=teacher, student=student)

    _, lrs, hrs = demo.holdout_pairs(data_dir)
    base = stage_config(overrides)
    reward_weights = tuple(tuple(pair) for pair in base.reward.rewards)
    before = score(gan, lrs, hrs, args.seeds, reward_weights)
    result = {"name": "reward_tiny"}
    methods = args.methods.split(",")
    for method in methods:
        config = stage_config(overrides)
        config.reward.method = method
        start = time.time()
        run_dir = os.path.join(workdir, config.stage, method + (f"_{args.tag}" if args.tag else ""))
        bundle = demo.train_config(config, run_dir, data_dir, args.steps, student=gan, teacher=teacher)
        after = score(bundle, lrs, hrs, args.seeds, reward_weights)
        result[method] = {f"{key}_{when}": values[key] for key in ("reward", "psnr", "diversity")
                          for when, values in (("before", before), ("after", after))}
        result[method]["train_seconds"] = round(time.time() - start, 1)
        print(f"{method}: {result[method]}", flush=True)
    first = result[methods[0]]
    result["unit"] = f"held-out reward gain ({methods[0]})"
    result["value"] = round(first["reward_after"] - first["reward_before"], 5)
    result["config"] = {"overrides": overrides, "rewards": reward_weights, "steps": args.steps or base.total_steps,
                        "batch_size": base.batch_size, "seeds_train": base.reward.seeds, "seeds_eval": args.seeds,
                        "holdout_images": len(lrs), "lr": base.optimizer.lr, "weights": base.weights.to_dict(),
                        **{k: base.reward[k] for k in ("beta", "kl_weight", "p_t_one", "rollout_batches")}}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
