"""Compile (without running) the full-size teacher, ISC, GAN and reward training steps; print XLA's memory analysis.

Every input is abstract (jax.ShapeDtypeStruct): no weights are loaded and nothing is allocated. The step is the
one train.py runs (state donated, frozen SD3.5 base in bf16, trainable fp32 + AdamW). XLA compiles for the
backend present: on a GPU host the figures are the GPU's; on CPU they are the CPU compiler's buffer
assignment, a close proxy for the peak (same graph, same remat decisions; fusion differs slightly).

  python benchmarks/memory_sd35m.py --stage student_isc --batch 16 --remat dots_with_no_batch_dims_saveable
  python benchmarks/memory_sd35m.py --stage teacher_fm --batch 32
  python benchmarks/memory_sd35m.py --stage student_gan --batch 8 --regularizer full
  python benchmarks/memory_sd35m.py --stage student_reward --batch 2 --seeds 8 --method nft

student_reward lowers with its config's reward networks as shapes (MUSIQ, MANIQA, CLIPIQA at their published
sizes) and LoRA rank 32; --batch counts LR images, each rolled out with --seeds seeds.

The last line is one JSON object: peak GiB (arguments + temporaries + outputs - aliased) against 141 GB.
"""

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402

from benchmarks import harness  # noqa: E402
from configs import student_gan, student_isc, student_reward, teacher_fm  # noqa: E402
from smfsr_jax.models import mmdit  # noqa: E402
from smfsr_jax.training import partition  # noqa: E402
from smfsr_jax.training import state as state_lib  # noqa: E402

DEVICE_BYTES = 141e9
CONFIGS = {"teacher_fm": teacher_fm, "student_isc": student_isc, "student_gan": student_gan,
           "student_reward": student_reward}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=sorted(CONFIGS), default="student_isc")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--remat", default="full", choices=sorted(mmdit.REMAT_POLICIES))
    parser.add_argument("--regularizer", choices=("full", "lora"), default="full")
    parser.add_argument("--seeds", type=int, default=8, help="student_reward: rollouts per LR image")
    parser.add_argument("--method", choices=("nft", "direct"), default="nft", help="student_reward")
    args = parser.parse_args()
    config = CONFIGS[args.stage].get_config("sd35m")
    config.model.remat_policy = args.remat
    reward = args.stage == "student_reward"
    if args.stage == "student_gan":
        config.regularizer.mode = args.regularizer
    if reward:
        config.reward.seeds, config.reward.method = args.seeds, args.method
    stage, optimizer, state = harness.abstract_stage(config)
    side, b = 512, args.batch
    batch = harness.train_batch(stage.frozen["null"], b, side)
    step = jax.jit(state_lib.make_train_step(stage.loss_fn, optimizer, seed=0), donate_argnums=(0,))
    start = time.perf_counter()
    compiled = step.lower(state, stage.frozen, batch).compile()
    seconds = time.perf_counter() - start
    mem = compiled.memory_analysis()
    peak = mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
    gib = lambda n: round(n / 2 ** 30, 2)  # noqa: E731
    print(f"arguments {gib(mem.argument_size_in_bytes)} GiB, temporaries {gib(mem.temp_size_in_bytes)} GiB, "
          f"outputs {gib(mem.output_size_in_bytes)} GiB, aliased {gib(mem.alias_size_in_bytes)} GiB")
    print(json.dumps({"name": f"memory_{args.stage}_sd35m", "value": gib(peak), "unit": "GiB",
                      "fits_141GB": peak < DEVICE_BYTES, "batch": b, "resolution": side, "remat": args.remat,
                      "regularizer": args.regularizer if args.stage == "student_gan" else None,
                      **({"seeds": args.seeds, "method": args.method} if reward else {}),
                      "trainable_params": partition.count(stage.trainable), "arguments_gib": gib(mem.argument_size_in_bytes),
                      "temporaries_gib": gib(mem.temp_size_in_bytes), "compile_seconds": round(seconds, 1),
                      "backend": jax.default_backend()}))


if __name__ == "__main__":
    main()
