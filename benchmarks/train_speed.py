"""Training-step time and MFU of the teacher_fm, student_isc and student_gan steps, random weights.

The step is the training loop's: `state.make_train_step` over the stage's loss, the state donated, trainable fp32 +
AdamW, the frozen parts in the config's `frozen_dtype`, the VAE encoding inside the step, one device. Each
batch size in `--batches` is AOT-compiled, then `--steps` steps are timed with no host sync between them
(the donated state chains them; one block at the end). A batch that does not fit is reported and ends the
search, so `--batches 4,8,16,32` finds the largest that fits.

FLOPs come from XLA's cost analysis of a copy of the step lowered with the block scans unrolled
(`harness.flop_counting`); the timed step keeps its scans. The ISC term (student_isc, student_gan) runs one of two
branches per step (boundary or interval split, `lax.cond`): both are counted and the executed FLOPs follow the
branches the timed steps drew (their `boundary_fraction` metric). MFU = executed FLOPs / time / peak, with the peak from
`--peak_tflops` or `harness.ACCELERATORS` (dense bf16).

  python benchmarks/train_speed.py --stage student_isc --batches 8,16,24 --attention cudnn
  python benchmarks/train_speed.py --stage student_gan --batches 4,8 --remat full
  python benchmarks/train_speed.py --stage teacher_fm --tiny        # CPU check of the whole script

The last line is one JSON object: value = MFU (%) of the largest batch that fits (step time without a peak).
"""

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import harness  # noqa: E402
from configs import student_gan, student_isc, teacher_fm  # noqa: E402
from smfsr_jax.core import cache  # noqa: E402
from smfsr_jax.models import attention, mmdit  # noqa: E402
from smfsr_jax.training import partition  # noqa: E402
from smfsr_jax.training import state as state_lib  # noqa: E402

CONFIGS = {"teacher_fm": teacher_fm, "student_isc": student_isc, "student_gan": student_gan}
TARGET_MFU = {"teacher_fm": 40.0, "student_isc": 40.0, "student_gan": 30.0}


def peak_flops(override: float | None) -> float | None:
    return override * 1e12 if override else harness.peak_flops(jax.devices()[0].device_kind)


def step_flops(update, state, frozen, batch, stage: str) -> dict:
    """{branch: FLOPs of one step}; ISC has 'boundary' and 'split', the other stages 'step'."""
    branches = {"step": None} if stage == "teacher_fm" else {"boundary": True, "split": False}
    flops = {}
    for name, branch in branches.items():
        with harness.flop_counting(branch):
            # A fresh function: jit reuses a function's trace, which would ignore the patched scan and cond.
            flops[name] = harness.cost_flops(jax.jit(lambda *a: update(*a)).lower(state, frozen, batch))
    return flops


def random_batch(abstract_batch, seed: int):
    """uint8 images uniform, caption embeddings ~ N(0, 1)."""
    return harness.random_tree(abstract_batch, seed=seed, std=1.0)


def measure(args, config, batch_size: int, peak: float | None) -> dict:
    stage, optimizer, abstract_state = harness.abstract_stage(config)
    trainable, frozen, model_state = stage.trainable, stage.frozen, stage.model_state
    update = state_lib.make_train_step(stage.loss_fn, optimizer, seed=0)
    side = config.data.degradation.crop_size
    abstract_batch = harness.train_batch(frozen["null"], batch_size, side)
    create = jax.jit(lambda p, m: state_lib.create_state(p, optimizer, False, m))
    flops = step_flops(update, abstract_state, frozen, abstract_batch, args.stage)

    step = jax.jit(update, donate_argnums=(0,))
    start = time.perf_counter()
    compiled = step.lower(abstract_state, frozen, abstract_batch).compile()
    compile_s = time.perf_counter() - start
    mem = compiled.memory_analysis()
    peak_bytes = (mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes
                  - mem.alias_size_in_bytes) if mem is not None else None
    result = {"batch": batch_size, "resolution": side, "compile_s": round(compile_s, 1),
              "peak_gib": round(peak_bytes / 2 ** 30, 2) if peak_bytes else None,
              "gflops_per_step": {k: round(v / 1e9, 1) for k, v in flops.items()}}
    limit = harness.device_bytes_limit()
    if limit and peak_bytes and peak_bytes > limit:
        return dict(result, fits=False, reason=f"needs {peak_bytes / 2 ** 30:.1f} GiB of {limit / 2 ** 30:.1f}")

    state = create(harness.random_tree(trainable, seed=0), harness.random_tree(model_state, seed=1))
    frozen_values = harness.random_tree(frozen, seed=2)
    batches = [random_batch(abstract_batch, seed=10 + i) for i in range(2)]
    try:
        for i in range(args.warmup):
            state, metrics = compiled(state, frozen_values, batches[i % 2])
        jax.block_until_ready(state)
        history = []
        start = time.perf_counter()
        for i in range(args.steps):
            state, metrics = compiled(state, frozen_values, batches[i % 2])
            history.append(metrics)
        jax.block_until_ready(state)
        seconds = (time.perf_counter() - start) / args.steps
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        return dict(result, fits=False, reason=str(e).splitlines()[0][:200])
    history = jax.device_get(history)
    losses = np.array([m["loss"] for m in history])
    if args.stage != "teacher_fm":
        fraction = float(np.mean([m["boundary_fraction"] for m in history]))
        executed = fraction * flops["boundary"] + (1 - fraction) * flops["split"]
        result["boundary_fraction"] = round(fraction, 3)
    else:
        executed = flops["step"]
    result.update(fits=True, step_ms=round(seconds * 1e3, 2), samples_per_s=round(batch_size / seconds, 2),
                  tflops_per_s=round(executed / seconds / 1e12, 3), finite=bool(np.isfinite(losses).all()),
                  trainable_params=partition.count(trainable))
    if peak:
        result["mfu_percent"] = round(100 * executed / seconds / peak, 2)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=sorted(CONFIGS), default="student_isc")
    parser.add_argument("--tiny", action="store_true", help="the stage's tiny config (CPU validation)")
    parser.add_argument("--batches", default=None, help="comma list of batch sizes (default: the config's)")
    parser.add_argument("--remat", choices=sorted(mmdit.REMAT_POLICIES), default=None)
    parser.add_argument("--attention", choices=("cudnn", "xla", "splash"), default=None,
                        help="MM-DiT attention (default: the platform's fused kernel, cudnn on a GPU, splash on a TPU, "
                             "else xla)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 20; 3 with --tiny)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--peak_tflops", type=float, default=None, help="device peak for MFU (dense bf16)")
    parser.add_argument("--compilation_cache", default=None, help="jax persistent compilation cache directory")
    args = parser.parse_args()
    args.steps = args.steps or (3 if args.tiny else 20)
    if args.compilation_cache:
        cache.keep_compiled_in(args.compilation_cache)
    config = CONFIGS[args.stage].get_config("tiny" if args.tiny else "sd35m")
    config.model.attention = args.attention or attention.fused_implementation() or "xla"
    if args.remat:
        config.model.remat_policy = args.remat
    batches = [int(b) for b in args.batches.split(",")] if args.batches else [config.batch_size]
    peak = peak_flops(args.peak_tflops)

    results = []
    for batch_size in batches:
        result = measure(args, config, batch_size, peak)
        results.append(result)
        print(f"[{args.stage}] batch {batch_size}: " + ", ".join(f"{k} {v}" for k, v in result.items()
                                                                 if k != "batch"))
        if not result["fits"]:
            break
    fitting = [r for r in results if r["fits"]]
    best = fitting[-1] if fitting else results[-1]
    mfu = best.get("mfu_percent")
    print(json.dumps({
        "name": f"train_speed_{args.stage}_{'tiny' if args.tiny else 'sd35m'}",
        "value": mfu if mfu is not None else best.get("step_ms"), "unit": "% MFU" if mfu is not None else "ms/step",
        "target_mfu_percent": TARGET_MFU.get(args.stage), "largest_batch": best["batch"] if fitting else None,
        "batches": results, "peak_tflops": peak / 1e12 if peak else None,
        "config": {"stage": args.stage, "variant": "tiny" if args.tiny else "sd35m", "dtype": config.model.dtype,
                   "frozen_dtype": config.frozen_dtype, "remat": config.model.remat_policy,
                   "attention": config.model.attention, "weights": "random", "steps": args.steps,
                   "regularizer": config.regularizer.mode if args.stage == "student_gan" else None},
        **harness.environment()}))


if __name__ == "__main__":
    main()
