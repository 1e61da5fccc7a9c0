"""Image summaries of a run: a stage's network sampled on a few examples of a batch."""

import jax
import jax.numpy as jnp

from smfsr_jax.core import images, schedules
from smfsr_jax.models import attention, mmdit, vae
from smfsr_jax.sampling import samplers
from smfsr_jax.training.stages.batch import encode_images, text_condition
from smfsr_jax.training.stages.stage import Stage


def make_preview_fn(stage: Stage, mesh=None, teacher_steps: int = 8, count: int = 4):
    """jitted (trainable, frozen, batch, rng) -> (count, S, 3S, 3) uint8 rows of [LR x4 | SR | HR].

    The student samples in one step (x = eps - u(eps, 0, 1)); a teacher with `teacher_steps` Euler steps on
    the SD3 grid, without CFG. `mesh`: the run's mesh, over which fused attention kernels split the batch.
    """
    model = mmdit.MMDiT(stage.model_config)
    autoencoder = vae.make_autoencoder(stage.autoencoder_config)

    def preview(trainable, frozen, batch, rng):
        with attention.batch_mesh(mesh):
            return preview_rows(trainable, frozen, {k: v[:count] for k, v in batch.items()}, rng)

    def preview_rows(trainable, frozen, batch, rng):
        rng_latents, rng_noise = jax.random.split(rng)
        lr = encode_images(stage.autoencoder_config, frozen["autoencoder"], batch["lr_up"], rng_latents)
        context, pooled = text_condition(frozen, batch, lr.shape[0])
        apply = lambda z, **kw: model.apply({"params": stage.model_params(trainable, frozen)}, z, **kw)  # noqa: E731
        noise = jax.random.normal(rng_noise, lr.shape)
        cond = {samplers.CONTEXT: context, samplers.POOLED: pooled}
        if stage.model_config.time_conditioning == "interval":
            z = samplers.one_step(samplers.student_velocity(apply), noise, lr, cond)
        else:
            z = samplers.euler_sample(samplers.teacher_velocity(apply), noise, lr, cond,
                                      schedules.sd3_sampling_sigmas(teacher_steps))
        x = autoencoder.apply({"params": frozen["autoencoder"]}, vae.denormalize_latents(z, stage.autoencoder_config),
                              method="decode")
        return jnp.concatenate([batch["lr_up"], images.from_signed(x), batch["hr"]], axis=2)

    return jax.jit(preview)
