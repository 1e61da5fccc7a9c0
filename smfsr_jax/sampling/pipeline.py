"""The SR steps and the fused SR function: preprocessed LR images -> x4 SR images (8-bit RGB), the SMFSR test
script in JAX (docs/design.md#sampling). The batch runner (runner.py) preprocesses with this module and runs the
steps on canvases (canvas.py), which compile per canvas instead of per size; `make_sr_function` is the same SR as
one XLA program for one image size, the reference the canvas path is measured against and what the full-size
speed and memory benchmarks compile. Its settings are settings.py's.

Per image:
1. LR preprocessing with PIL bicubic (SMFSR/DiT4SR test_wollava.py): if a side is below process_size/4 = 128,
   upscale by 128/min(w, h) to (int(s·w), int(s·h)); upscale x4; floor both sides to a multiple of the
   autoencoder's downscale (8 for SD3, as upstream). The MM-DiT needs latent sides divisible by its patch size;
   latents that are not are tiled with patch-multiple tiles (tiling.py), which reproduces upstream wherever
   upstream runs (it tiles the same way for large latents and fails on odd untiled ones).
2. VAE encode of the preprocessed LR with a posterior sample, normalise: z_lr.
3. ε ~ N(0, I) at the latent size; sampling (tiled when large): the student runs the cosine grid
   (z ← z + (r − t)·u(z, r, t); 1 step by default), the teacher 40 Euler steps on the SD3 shift-3 grid with CFG 8
   against the negative prompt (DiT4SR test defaults).
4. Decode, (x/2 + 0.5) clamped to [0, 1], rounded to 8 bits (diffusers' PIL output), colour correction against the
   preprocessed LR (color.py: AdaIN default, truncating to 8 bits), then a PIL bicubic resize to 4x the original
   LR size (a no-op when the size already matches, e.g. 128² -> 512²).

Seeds (docs/design.md#noise-seeding): image k (its noise index: its place in sorted file order) uses
key_k = fold_in(PRNGKey(seed), k): ε = normal(key_k, latent shape) and the posterior sample uses fold_in(key_k, 1),
so the random draws do not depend on batching. The outputs then agree up to float rounding: XLA's kernels depend on
the batch size, so an 8-bit value can move by one level at a few pixels.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P
from PIL import Image

from smfsr_jax.core import images
from smfsr_jax.models import mmdit, vae, vae_tiling
from smfsr_jax.sampling import color, samplers, tiling
from smfsr_jax.sampling.settings import PROCESS_SIZE, UPSCALE, SRSettings, positional_grid
from smfsr_jax.weights import bundle as bundle_lib

POSTERIOR_STREAM = 1  # fold_in(key_k, 1) draws the posterior sample; key_k itself draws ε
DATA = "data"  # the mesh axis the images of a batch are split over


def resize_plan(height: int, width: int, multiple: int, upscale: int = UPSCALE,
                process_size: int = PROCESS_SIZE) -> list[tuple[int, int]]:
    """The (width, height) targets of upstream's successive PIL bicubic resizes; the last is the processed size."""
    plan = []
    min_side = process_size // upscale
    if width < min_side or height < min_side:
        scale = min_side / min(width, height)
        width, height = int(scale * width), int(scale * height)
        plan.append((width, height))
    width, height = width * upscale, height * upscale
    plan.append((width, height))
    plan.append((width // multiple * multiple, height // multiple * multiple))
    return plan


def prepare_lr(image: np.ndarray, multiple: int, upscale: int = UPSCALE,
               process_size: int = PROCESS_SIZE) -> np.ndarray:
    """(H, W, 3) uint8 LR -> the preprocessed (H', W', 3) uint8 image the VAE encodes (8 bits between resizes)."""
    pil = Image.fromarray(image)
    for size in resize_plan(image.shape[0], image.shape[1], multiple, upscale, process_size):
        pil = pil.resize(size, Image.BICUBIC)  # PIL returns a copy when the size already matches
    return np.asarray(pil)


def image_keys(seed: int, indices) -> jax.Array:
    """(B, 2) uint32 keys fold_in(PRNGKey(seed), k) for the image indices k."""
    base = jax.random.PRNGKey(seed)
    return jax.vmap(lambda k: jax.random.fold_in(base, k))(jnp.asarray(indices, jnp.uint32))


def initial_noise(keys, latent_shape) -> jax.Array:
    """ε of each image: normal(key_k, latent_shape), whatever the batch it is in."""
    return jax.vmap(lambda key: jax.random.normal(key, latent_shape, jnp.float32))(keys)


def processed_size(height: int, width: int, settings: SRSettings, multiple: int) -> tuple[int, int]:
    """(H', W') of the preprocessed LR of an (height, width) input, and of its SR before the final resize."""
    width, height = resize_plan(height, width, multiple, settings.upscale, settings.process_size)[-1]
    return height, width


@functools.lru_cache(maxsize=None)
def make_sr_function(transformer_config: mmdit.MMDiTConfig, autoencoder_config: vae.VAEConfig,
                     settings: SRSettings, mesh: jax.sharding.Mesh | None = None):
    """jit(fn(transformer_params, autoencoder_params, lr_images, keys, cond) -> sr) for resolved `settings`.

    lr_images: (B, H', W', 3) uint8 preprocessed LR; keys: (B, 2) `image_keys`; cond: {'context', 'pooled'} and,
    for a guided teacher, {'negative_context', 'negative_pooled'}, leading axis B. Returns (B, H', W', 3) uint8.
    With a mesh, the batch is split over its DATA axis (B a multiple of its size) and each device runs the same
    program on its B / size images (shard_map: no cross-device traffic, and the tiling's chunks stay per device);
    the parameters are replicated. Images larger than settings.vae_tile pixels (0: never) are encoded and decoded
    in tiles (vae_tiling.py). Cached on its (hashable) arguments: one compiled function per model and settings.
    """
    if not settings.resolved:
        raise ValueError("make_sr_function needs resolved settings (SRSettings.resolve)")
    network = mmdit.MMDiT(transformer_config)
    kind = bundle_lib.transformer_kind(transformer_config)
    times = np.asarray(settings.times(kind), np.float32)

    def sr(transformer_params, autoencoder_params, lr_images, keys, cond):
        mean, logvar = vae_tiling.encode(autoencoder_params, autoencoder_config, images.to_signed(lr_images),
                                         settings.vae_tile)
        posterior_keys = jax.vmap(lambda key: jax.random.fold_in(key, POSTERIOR_STREAM))(keys)
        lr_latents = vae.normalize_latents(jax.vmap(vae.sample_latent)(posterior_keys, mean, logvar),
                                           autoencoder_config)
        noise = initial_noise(keys, lr_latents.shape[1:])
        apply_fn = functools.partial(network.apply, {"params": transformer_params})
        velocity = (samplers.student_velocity(apply_fn) if kind == "student"
                    else samplers.teacher_velocity(apply_fn, settings.guidance_scale))
        velocity = tiling.tiled_velocity(velocity, settings.tile_size, settings.tile_overlap, settings.tile_batch,
                                         transformer_config.patch_size, positional_grid(transformer_config))
        latents = samplers.euler_sample(velocity, noise, lr_latents, cond, times)
        decoded = vae_tiling.decode(autoencoder_params, autoencoder_config,
                                    vae.denormalize_latents(latents, autoencoder_config), settings.vae_tile)
        return color.color_fix(images.from_signed(decoded), lr_images, settings.color_fix, settings.output_rounding)

    if mesh is None:
        return jax.jit(sr)
    return jax.jit(jax.shard_map(sr, mesh=mesh, in_specs=(P(), P(), P(DATA), P(DATA), P(DATA)), out_specs=P(DATA)))
