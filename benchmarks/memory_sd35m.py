"""Compile (without running) the full-size stage-1 (ISC) and stage-2 (GAN) steps and print XLA's memory analysis.

Every input is abstract (jax.ShapeDtypeStruct): no weights are loaded and nothing is allocated. The step is the
one train.py runs (state donated, frozen SD3.5 base in bf16, trainable fp32 + AdamW). XLA compiles for the
backend present: on a GPU host the figures are the GPU's; on CPU they are the CPU compiler's buffer
assignment, a close proxy for the peak (same graph, same remat decisions; fusion differs slightly).

  python benchmarks/memory_sd35m.py --stage isc --batch 16 --remat dots_with_no_batch_dims_saveable
  python benchmarks/memory_sd35m.py --stage gan --batch 8 --regularizer full

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
import jax.numpy as jnp  # noqa: E402

from configs import student_gan, student_isc  # noqa: E402
from smfsr_jax.convert.vae import abstract_params as vae_abstract_params  # noqa: E402
from smfsr_jax.models import discriminator, dinov3, lpips, mmdit, vae  # noqa: E402
from smfsr_jax.training import gan, partition, stages  # noqa: E402
from smfsr_jax.training import state as state_lib  # noqa: E402

DEVICE_BYTES = 141e9
TEXT_TOKENS, POOLED = 154, 2048


def abstract(tree, dtype=None):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype or x.dtype), tree)


def networks(config):
    student_cfg = mmdit.MMDiTConfig.from_dict(config.model.to_dict())
    teacher_cfg = student_cfg.replace(time_conditioning="single", time_scale=1000.0)
    student, teacher = mmdit.abstract_params(student_cfg), mmdit.abstract_params(teacher_cfg)
    teacher_own, base = partition.partition(teacher, stages.TEACHER_OWN)
    trainable, student_frozen = partition.partition(student, config.trainable, ("to_k_control",))
    student_own, _ = partition.partition(student_frozen, config.trainable)
    ae_cfg = vae.VAEConfig.sd3(dtype="bfloat16", remat=True)
    bf16 = jnp.bfloat16
    frozen = {"base": abstract(base, bf16), "own": abstract(student_own, bf16), "teacher": abstract(teacher_own, bf16),
              "autoencoder": abstract(vae_abstract_params(ae_cfg)),
              "null": {"prompt_embeds": jax.ShapeDtypeStruct((TEXT_TOKENS, 4096), jnp.float32),
                       "pooled_prompt_embeds": jax.ShapeDtypeStruct((POOLED,), jnp.float32)}}
    return student_cfg, teacher_cfg, ae_cfg, teacher, trainable, frozen


def gan_parts(config, teacher, teacher_cfg, frozen):
    reg_trainable, reg_frozen = gan.regularizer_parts(teacher, teacher_cfg, config.regularizer)
    lpips_cfg = lpips.LPIPSConfig(net="vgg")
    image = jnp.zeros((1, 64, 64, 3))
    lpips_params = jax.eval_shape(lambda: lpips.LPIPS(lpips_cfg).init(jax.random.PRNGKey(0), image, image)["params"])
    backbone = dinov3.DINOv3Config.vits16()
    dino_params = dinov3.abstract_params(backbone)
    disc_cfg = discriminator.DiscriminatorConfig(backbone=backbone)
    features = tuple(jax.ShapeDtypeStruct((2, 196, 384), jnp.float32) for _ in disc_cfg.tap_names)
    variables = jax.eval_shape(lambda f: discriminator.Discriminator(disc_cfg).init(jax.random.PRNGKey(0), f),
                               features)
    frozen = dict(frozen, regularizer=abstract(reg_frozen, jnp.bfloat16), lpips=lpips_params, dinov3=dino_params)
    return abstract(reg_trainable), variables["params"], {"spectral": variables["spectral"]}, lpips_cfg, disc_cfg, frozen


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=("isc", "gan"), default="isc")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--remat", default="dots_with_no_batch_dims_saveable", choices=sorted(mmdit.REMAT_POLICIES))
    parser.add_argument("--regularizer", choices=("full", "lora"), default="full")
    args = parser.parse_args()
    config = (student_isc if args.stage == "isc" else student_gan).get_config("sd35m")
    config.model.remat_policy = args.remat
    if args.stage == "gan":
        config.regularizer.mode = args.regularizer
    student_cfg, teacher_cfg, ae_cfg, teacher, trainable, frozen = networks(config)
    model_state, parts = {}, ()
    if args.stage == "isc":
        loss_fn = stages.make_student_loss(config, student_cfg, teacher_cfg, ae_cfg)
    else:
        reg, heads, model_state, lpips_cfg, disc_cfg, frozen = gan_parts(config, teacher, teacher_cfg, frozen)
        trainable = {"student": trainable, "regularizer": reg, "discriminator": heads}
        losses = gan.make_losses(config, student_cfg, teacher_cfg, ae_cfg, lpips_cfg, disc_cfg)
        loss_fn = gan.combine_losses(losses, config.weights)
        parts = gan.PARTS
    optimizer = state_lib.make_optimizer(config.optimizer, parts)
    state = jax.eval_shape(lambda p, m: state_lib.create_state(p, optimizer, False, m), trainable, model_state)
    side, b = 512, args.batch
    batch = {"hr": jax.ShapeDtypeStruct((b, side, side, 3), jnp.uint8),
             "lr_up": jax.ShapeDtypeStruct((b, side, side, 3), jnp.uint8),
             "prompt_embeds": jax.ShapeDtypeStruct((b, TEXT_TOKENS, 4096), jnp.float32),
             "pooled_prompt_embeds": jax.ShapeDtypeStruct((b, POOLED), jnp.float32)}
    step = jax.jit(state_lib.make_train_step(loss_fn, optimizer, seed=0), donate_argnums=(0,))
    start = time.perf_counter()
    compiled = step.lower(state, frozen, batch).compile()
    seconds = time.perf_counter() - start
    mem = compiled.memory_analysis()
    peak = mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
    gib = lambda n: round(n / 2 ** 30, 2)  # noqa: E731
    print(f"arguments {gib(mem.argument_size_in_bytes)} GiB, temporaries {gib(mem.temp_size_in_bytes)} GiB, "
          f"outputs {gib(mem.output_size_in_bytes)} GiB, aliased {gib(mem.alias_size_in_bytes)} GiB")
    print(json.dumps({"name": f"memory_{args.stage}_sd35m", "value": gib(peak), "unit": "GiB",
                      "fits_141GB": peak < DEVICE_BYTES, "batch": b, "resolution": side, "remat": args.remat,
                      "regularizer": args.regularizer if args.stage == "gan" else None,
                      "trainable_params": partition.count(trainable), "arguments_gib": gib(mem.argument_size_in_bytes),
                      "temporaries_gib": gib(mem.temp_size_in_bytes), "compile_seconds": round(seconds, 1),
                      "backend": jax.default_backend()}))


if __name__ == "__main__":
    main()
