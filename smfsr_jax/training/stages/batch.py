"""A stage's batches: the data pipeline's seed, and what the step computes of each batch inside the loss (the
latents of its images through the frozen autoencoder, its text condition, the ISC options)."""

import zlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from smfsr_jax.core import images
from smfsr_jax.models import vae
from smfsr_jax.objectives import isc


def data_seed(config: ml_collections.ConfigDict) -> int:
    """The data pipeline's seed: the run seed with the stage name folded in, so that the stages of one recipe
    see different crops and degradations for the same (epoch, record)."""
    state = np.random.SeedSequence([config.seed, zlib.crc32(config.stage.encode())]).generate_state(1)
    return int(state[0] & 0x7FFFFFFF)


def encode_images(ae_config: vae.VAEConfig, ae_params, images_u8, rng):
    """uint8 NHWC images -> normalised latents from a posterior sample (the frozen encoder)."""
    mean, logvar = vae.make_autoencoder(ae_config).apply({"params": ae_params}, images.to_signed(images_u8),
                                                         method="encode")
    return vae.normalize_latents(vae.sample_latent(rng, mean, logvar), ae_config)


def batch_latents(ae_config, frozen, batch, rng):
    """(HR latents, LR latents) of a batch, encoded by the frozen autoencoder."""
    rng_hr, rng_lr = jax.random.split(rng)
    ae = jax.lax.stop_gradient(frozen["autoencoder"])
    return encode_images(ae_config, ae, batch["hr"], rng_hr), encode_images(ae_config, ae, batch["lr_up"], rng_lr)


def text_condition(frozen, batch, batch_size: int):
    """(context, pooled) per sample: cached caption embeddings (NULL already swapped in for dropped
    captions by the pipeline), or the NULL embeddings when the dataset has no captions."""
    if "prompt_embeds" in batch:
        return batch["prompt_embeds"], batch["pooled_prompt_embeds"]
    null = frozen["null"]
    return (jnp.broadcast_to(null["prompt_embeds"], (batch_size, *null["prompt_embeds"].shape)),
            jnp.broadcast_to(null["pooled_prompt_embeds"], (batch_size, *null["pooled_prompt_embeds"].shape)))


def isc_options(isc_config: ml_collections.ConfigDict) -> dict:
    """The sampler and weighting keywords of `isc.isc_loss` (`isc.DEFAULT_OPTIONS`) from a stage's `isc` config."""
    return {name: isc_config[name] for name in isc.DEFAULT_OPTIONS}
