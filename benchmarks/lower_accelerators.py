"""Lower the one-step SR function and the training steps for CUDA and TPU on a host that has neither: does each
one trace and export, for the accelerators it is made for?

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/lower_accelerators.py \
      --platforms cuda,tpu --variant sd35m
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/lower_accelerators.py --variant tiny

Every input is abstract (jax.ShapeDtypeStruct): nothing is allocated. The cases, each exported with
`jax.export` for each platform:
- `sr_b1`, `sr_b16`: the SR function of `SRPipeline` (SMFSR student on SD3.5-M with the LR stream, SD3 VAE,
  bf16, one step) from 128² LR to 512² at batch 1 and 16; `sr_tiled`: 512² to 2048² (latent tiles, VAE tiles).
  Tiny: the tiny networks at 8² (batch 1 and 4) and 32² LR;
- `<stage>`: the step train.py runs (`state.jit_train_step`: the config's mesh and sharding rules over all
  local devices, the state donated) at the config's batch (rounded up to a multiple of the device count);
  `preview_<stage>`: the run's image preview (4 images) on the same mesh and weights; `holdout_student_reward`:
  stage 3's held-out evaluation (its crops x seeds split over the mesh).
One JSON line per (case, platform):
- `lowered` and, when not, the first line of the error;
- `attention`: the MM-DiT's attention path in the trace: the configs' default (None), splash on a TPU and the
  XLA path on CUDA; cuDNN's fused attention, opt-in on a GPU, cannot be traced without one ("cuDNN is not
  detected"): the CUDA check covers everything but that kernel;
- `flops` and `bytes_accessed`: XLA's cost analysis of the lowered (not yet optimised) module, which does not
  depend on the platform; a scan over blocks counts its body once (train_speed.py unrolls for the full count);
- `collectives`: all-reduce, all-gather, reduce-scatter, all-to-all and collective-permute ops in the module
  XLA's SPMD partitioner makes for this host's devices (with `--collectives`; the partitioning is the same
  for every platform, the fusion around it is not).
The last line counts the cases lowered.
"""

import argparse
import json
import os
import re
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import export  # noqa: E402

from benchmarks import harness, sr_memory  # noqa: E402
from configs import student_gan, student_isc, student_reward, teacher_fm  # noqa: E402
from smfsr_jax.core import mesh as mesh_lib  # noqa: E402
from smfsr_jax.models import attention  # noqa: E402
from smfsr_jax.training import sharding  # noqa: E402
from smfsr_jax.training import state as state_lib  # noqa: E402
from smfsr_jax.training.stages import preview as preview_lib  # noqa: E402
from smfsr_jax.training.stages import reward as reward_stage  # noqa: E402

CONFIGS = {"teacher_fm": teacher_fm, "student_isc": student_isc, "student_gan": student_gan,
           "student_reward": student_reward}
PLATFORMS = ("cuda", "tpu")
COLLECTIVE = re.compile(r"\b(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)(-start)?\(")
SR_CASES = {"sd35m": (("sr_b1", 128, 1), ("sr_b16", 128, 16), ("sr_tiled", 512, 1)),
            "tiny": (("sr_b1", 8, 1), ("sr_b16", 8, 4), ("sr_tiled", 32, 1))}


def sr_cases(variant: str):
    """(jitted SR function, abstract arguments, description) for each SR case."""
    tiny = variant == "tiny"
    dtype = "bfloat16"
    transformer, autoencoder, tokens = sr_memory.networks(tiny, dtype)
    vae_tile = sr_memory.TINY_VAE_TILE if tiny else sr_memory.VAE_TILE
    for name, lr_side, batch in SR_CASES[variant]:
        fn, args = sr_memory.sr_function(transformer, autoencoder, tokens, jnp.dtype(dtype), 4 * lr_side, batch,
                                         vae_tile)
        yield fn, args, {"case": name, "batch": batch, "lr_side": lr_side, "resolution": 4 * lr_side, "devices": 1,
                         "dtype": dtype, "attention_config": transformer.attention,
                         "attention": attention.traced_implementation(transformer.attention, dtype)}


def stage_cases(stage_name: str, variant: str):
    """(jitted function, abstract arguments, description) for the functions a run of this stage jits on its mesh:
    the training step (`<stage>`: the config's batch rounded up to a multiple of the devices), the image preview
    (`preview_<stage>`) and, for student_reward, the held-out evaluation (`holdout_<stage>`)."""
    config = CONFIGS[stage_name].get_config(variant)
    mesh = mesh_lib.make_mesh(config.mesh)
    rules = [tuple(rule) for rule in config.sharding_rules]
    stage, optimizer, abstract_state = harness.abstract_stage(config, use_ema=config.ema_decay is not None)
    state_shardings = state_lib.state_shardings(abstract_state, mesh, rules)
    frozen_shardings = sharding.param_shardings(stage.frozen, mesh, rules)
    step = state_lib.jit_train_step(
        state_lib.make_train_step(stage.loss_fn, optimizer, seed=config.seed, ema_decay=config.ema_decay),
        state_shardings, frozen_shardings, mesh)
    devices = mesh.devices.size
    batch = -(-config.batch_size // devices) * devices
    side = config.data.degradation.crop_size
    placed = lambda tree, shardings: jax.tree.map(  # noqa: E731
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
    state, frozen = placed(abstract_state, state_shardings), placed(stage.frozen, frozen_shardings)
    batch_shapes = harness.train_batch(stage.frozen["null"], batch, side)
    batch_shapes = placed(batch_shapes, jax.tree.map(lambda _: mesh_lib.batch_sharding(mesh), batch_shapes))
    dtype = config.model.dtype
    description = {"batch": batch, "resolution": side, "devices": devices, "mesh": dict(mesh.shape), "dtype": dtype,
                   "attention_config": config.model.attention,
                   "attention": attention.traced_implementation(config.model.attention, dtype)}
    yield step, (state, frozen, batch_shapes), {"case": stage_name, **description}
    preview = preview_lib.make_preview_fn(stage, mesh)
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32)
    yield preview, (state.params, frozen, batch_shapes, rng), {"case": f"preview_{stage_name}", **description,
                                                               "batch": 4}
    if stage_name == "student_reward":
        reward_fns, _ = reward_stage.load_rewards(config.reward, abstract=True)
        holdout = reward_stage.holdout_function(config, stage.model_config, stage.autoencoder_config, reward_fns,
                                                stage.lora, None, mesh)
        crops = config.holdout.max_crops
        scale = config.data.degradation.scale
        data = {"hr": jax.ShapeDtypeStruct((crops, side, side, 3), jnp.uint8),
                "lr": jax.ShapeDtypeStruct((crops, side // scale, side // scale, 3), jnp.uint8),
                "lr_up": jax.ShapeDtypeStruct((crops, side, side, 3), jnp.uint8)}
        data = placed(data, jax.tree.map(lambda _: mesh_lib.replicated(mesh), data))
        yield holdout, (state.params, frozen, data, None), {"case": f"holdout_{stage_name}", **description,
                                                            "batch": crops * config.holdout.seeds}


def count_collectives(step, args) -> int:
    return len(COLLECTIVE.findall(step.lower(*args).compile().as_text()))


def first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


def build_cases(chosen, variant: str) -> list:
    cases = list(sr_cases(variant)) if "sr" in chosen else []
    cases += [case for name in chosen if name != "sr" for case in stage_cases(name, variant)]
    for _, _, description in cases:
        description["case"] = f"{description['case']}_{variant}"
    return cases


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--platforms", default=",".join(PLATFORMS))
    parser.add_argument("--variant", choices=("tiny", "sd35m"), default="sd35m")
    parser.add_argument("--cases", default=",".join(["sr", *CONFIGS]), help="sr and/or stage names")
    parser.add_argument("--collectives", action="store_true", help="compile for this host to count collectives")
    args = parser.parse_args()
    platforms = [p for p in args.platforms.split(",") if p]
    chosen = [c for c in args.cases.split(",") if c]
    measures = {}  # XLA's estimates of the host lowering (the XLA attention path)
    for step, step_args, description in build_cases(chosen, args.variant):
        cost = step.lower(*step_args).cost_analysis() or {}
        measures[description["case"]] = {"flops": cost.get("flops"), "bytes_accessed": cost.get("bytes accessed")}
        if args.collectives:
            measures[description["case"]]["collectives"] = count_collectives(step, step_args)
    lowered = total = 0
    for platform in platforms:
        jax.clear_caches()  # a jitted function keeps its first trace; the attention path depends on the platform
        with attention.target(platform):
            for step, step_args, description in build_cases(chosen, args.variant):
                start = time.perf_counter()
                try:
                    export.export(step, platforms=(platform,))(*step_args).mlir_module_serialized
                    result = {"lowered": True}
                except Exception as error:  # noqa: BLE001 (reported per case, the next case still runs)
                    result = {"lowered": False, "error": first_line(error)}
                total += 1
                lowered += result["lowered"]
                print(json.dumps({"name": "lower", "platform": platform, **description, **result,
                                  **measures[description["case"]], "seconds": round(time.perf_counter() - start, 1)}),
                      flush=True)
    print(json.dumps({"name": "lower_accelerators", "value": lowered, "unit": "cases lowered", "of": total,
                      "variant": args.variant, "platforms": platforms, "backend": jax.default_backend(),
                      "devices": jax.device_count(), "speedup": None}))


if __name__ == "__main__":
    main()
