"""SRPipeline: LR images -> x4 SR images (8-bit RGB), the SMFSR test script in JAX (docs/design.md#sampling).

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

Seeds (docs/design.md#noise-seeding): image k (its index in sorted file order; `indices=`) uses key_k = fold_in(PRNGKey(seed), k):
ε = normal(key_k, latent shape) and the posterior sample uses fold_in(key_k, 1), so the random draws do not depend
on batching. The outputs then agree up to float rounding: XLA's kernels depend on the batch size, so an 8-bit value
can move by one level at a few pixels. Images are grouped by preprocessed size; each group runs in batches of
`batch_size` images per device (the last padded by repetition), one jitted function per batch, compiled once
per shape.

Devices: a batch is split over every local device of this process (`devices=`: a subset) on a 1-D DATA mesh
(NamedSharding); each device holds a replica of the parameters and runs batch_size images, so one call takes
`call_batch_size` = batch_size x devices images and batch_size=1 already uses every device once there are that
many images of one size. The noise keys are per image, so the outputs do not depend on the device count (up to
the same float rounding). The pipeline never talks to other processes: with several processes (sr.py,
evaluate.py), each gives its own share of the images to its own pipeline.

Captions: with text encoders in the bundle, a caption goes through SMFSR's caption rule (`postprocess_caption`,
unless caption_rule=False) and the SD3 encoders, with T5 length = NULL length − 77; without encoders the NULL
embeddings are used (and a warning is logged once).
"""

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P
from PIL import Image

from smfsr_jax.core import images, schedules
from smfsr_jax.core import mesh as mesh_lib
from smfsr_jax.models import mmdit, text, vae, vae_tiling
from smfsr_jax.sampling import color, samplers, tiling
from smfsr_jax.weights import bundle as bundle_lib

UPSCALE = 4
PROCESS_SIZE = 512  # upstream --process_size: LR sides below PROCESS_SIZE // UPSCALE are upscaled first
STUDENT_STEPS = 1
TEACHER_STEPS, TEACHER_GUIDANCE = 40, 8.0
POSTERIOR_STREAM = 1  # fold_in(key_k, 1) draws the posterior sample; key_k itself draws ε
DATA = "data"  # the mesh axis the images of a batch are split over

log = logging.getLogger(__name__)


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


@functools.lru_cache(maxsize=None)
def make_sr_function(transformer_config: mmdit.MMDiTConfig, autoencoder_config: vae.VAEConfig, *, times: tuple,
                     guidance_scale: float = 1.0, color_method: str = "adain", rounding: str = "truncate",
                     tile_size: int = tiling.TILE_SIZE, tile_overlap: int = tiling.TILE_OVERLAP,
                     tile_batch: int = tiling.TILE_BATCH, vae_tile: int = vae_tiling.DEFAULT_TILE,
                     mesh: jax.sharding.Mesh | None = None):
    """jit(fn(transformer_params, autoencoder_params, lr_images, keys, cond) -> sr) for one sampler setting.

    lr_images: (B, H', W', 3) uint8 preprocessed LR; keys: (B, 2) `image_keys`; cond: {'context', 'pooled'} and,
    for a guided teacher, {'negative_context', 'negative_pooled'}, leading axis B. Returns (B, H', W', 3) uint8.
    With a mesh, the batch is split over its DATA axis (B a multiple of its size) and each device runs the same
    program on its B / size images (shard_map: no cross-device traffic, and the tiling's chunks stay per device);
    the parameters are replicated. Images larger than vae_tile pixels (0: never) are encoded and decoded in tiles
    (vae_tiling.py). Cached on its (hashable) arguments, so pipelines with the same settings share
    compilations.
    """
    network = mmdit.MMDiT(transformer_config)
    times = np.asarray(times, np.float32)
    student = bundle_lib.transformer_kind(transformer_config) == "student"

    def sr(transformer_params, autoencoder_params, lr_images, keys, cond):
        mean, logvar = vae_tiling.encode(autoencoder_params, autoencoder_config, images.to_signed(lr_images), vae_tile)
        posterior_keys = jax.vmap(lambda key: jax.random.fold_in(key, POSTERIOR_STREAM))(keys)
        lr_latents = vae.normalize_latents(jax.vmap(vae.sample_latent)(posterior_keys, mean, logvar),
                                           autoencoder_config)
        noise = initial_noise(keys, lr_latents.shape[1:])
        apply_fn = functools.partial(network.apply, {"params": transformer_params})
        velocity = (samplers.student_velocity(apply_fn) if student
                    else samplers.teacher_velocity(apply_fn, guidance_scale))
        velocity = tiling.tiled_velocity(velocity, tile_size, tile_overlap, tile_batch, transformer_config.patch_size,
                                         transformer_config.patch_size * transformer_config.pos_embed_max_size)
        latents = samplers.euler_sample(velocity, noise, lr_latents, cond, times)
        decoded = vae_tiling.decode(autoencoder_params, autoencoder_config,
                                    vae.denormalize_latents(latents, autoencoder_config), vae_tile)
        return color.color_fix(images.from_signed(decoded), lr_images, color_method, rounding)

    if mesh is None:
        return jax.jit(sr)
    return jax.jit(jax.shard_map(sr, mesh=mesh, in_specs=(P(), P(), P(DATA), P(DATA), P(DATA)), out_specs=P(DATA)))


def _as_rgb8(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"images must be (H, W, 3) uint8 RGB arrays or PIL images, got {image.shape} {image.dtype}")
    return image


class SRPipeline:
    """x4 super-resolution with a student (or teacher) bundle; see the module docstring.

    `SRPipeline.from_checkpoint(bundle_dir)(image, seed=0)` -> (4H, 4W, 3) uint8; a list of images gives a list.
    batch_size: images per device and call; devices: the devices a batch is split over (default: all local ones).
    """

    def __init__(self, transformer_config: mmdit.MMDiTConfig, transformer_params, autoencoder_config: vae.VAEConfig,
                 autoencoder_params, null_embeddings, *, negative_embeddings=None, text_encoders_dir: str | None = None,
                 batch_size: int = 1, tile_size: int = tiling.TILE_SIZE, tile_overlap: int = tiling.TILE_OVERLAP,
                 tile_batch: int = tiling.TILE_BATCH, process_size: int = PROCESS_SIZE, upscale: int = UPSCALE,
                 caption_rule: bool = True, output_rounding: str = "truncate", devices=None,
                 vae_tile: int = vae_tiling.DEFAULT_TILE):
        patch = transformer_config.patch_size
        if tile_size % patch or tile_size // patch > transformer_config.pos_embed_max_size:
            raise ValueError(f"tile_size {tile_size} must be a multiple of the patch size {patch} and at most "
                             f"{patch * transformer_config.pos_embed_max_size} (the positional-embedding grid)")
        if not 0 <= tile_overlap < tile_size:
            raise ValueError(f"tile_overlap must be in [0, tile_size), got {tile_overlap}")
        if batch_size < 1 or tile_batch < 1:
            raise ValueError(f"batch_size and tile_batch must be >= 1, got {batch_size} and {tile_batch}")
        if output_rounding not in color.ROUNDINGS:
            raise ValueError(f"output_rounding must be one of {color.ROUNDINGS}, got {output_rounding!r}")
        if vae_tile < 0 or vae_tile % autoencoder_config.downscale:
            raise ValueError(f"vae_tile must be 0 (off) or a positive multiple of the autoencoder's downscale "
                             f"{autoencoder_config.downscale} pixels, got {vae_tile}")
        self.transformer_config = transformer_config
        self.autoencoder_config = autoencoder_config
        # Batches are split over these devices (default: all of this process's); each holds all parameters.
        self.mesh = mesh_lib.make_mesh([(DATA, -1)], jax.local_devices() if devices is None else devices)
        self.transformer_params = jax.device_put(transformer_params, mesh_lib.replicated(self.mesh))
        self.autoencoder_params = jax.device_put(autoencoder_params, mesh_lib.replicated(self.mesh))
        self.null_embeddings = tuple(np.asarray(a, np.float32) for a in null_embeddings)
        self.negative_embeddings = (None if negative_embeddings is None
                                    else tuple(np.asarray(a, np.float32) for a in negative_embeddings))
        self.text_encoders_dir = text_encoders_dir
        self.batch_size, self.tile_batch = batch_size, tile_batch
        self.tile_size, self.tile_overlap, self.vae_tile = tile_size, tile_overlap, vae_tile
        self.process_size, self.upscale = process_size, upscale
        self.caption_rule, self.output_rounding = caption_rule, output_rounding
        self._text_encoders = None
        self._embedding_cache = {}
        self._warned_no_encoders = False

    @classmethod
    def from_checkpoint(cls, path: str, *, dtype: str | None = None, attention: str | None = None, **options):
        """Load a bundle directory (bundle.py); dtype/attention override the transformer config; options go to
        the constructor (batch_size, tile_size, tile_overlap, tile_batch, process_size, caption_rule, ...)."""
        overrides = {k: v for k, v in (("dtype", dtype), ("attention", attention)) if v is not None}
        return cls.from_bundle(bundle_lib.load_bundle(path, **overrides), **options)

    @classmethod
    def from_pretrained(cls, model: str, base: str, *, null_embeddings: str | None = None,
                        lr_key_bug: bool | None = None, cache_dir: str | None = None, dtype: str | None = None,
                        attention: str | None = None, **options):
        """Released weights: MODEL (smfsr_q, dit4sr_r1, ...: a directory or a Hugging Face Hub id such as
        zw121/SMFSR/smfsr_q) with BASE (Stable Diffusion 3.5 Medium), converted once into the cache and loaded
        from it afterwards (weights/pretrained.py). null_embeddings: a directory with DiT4SR's NULL_*.pt;
        lr_key_bug: overrides the published name's; dtype, attention and options as in `from_checkpoint`."""
        from smfsr_jax.weights import pretrained  # huggingface_hub only for released weights
        overrides = {k: v for k, v in (("dtype", dtype), ("attention", attention)) if v is not None}
        loaded = pretrained.load_pretrained(model, base, null_embeddings=null_embeddings, lr_key_bug=lr_key_bug,
                                            cache_dir=cache_dir, **overrides)
        return cls.from_bundle(loaded, **options)

    @classmethod
    def from_bundle(cls, b: bundle_lib.Bundle, **options):
        """A loaded bundle (or a training checkpoint from training.inference.load_checkpoint).

        Tiles default to the latent size the network was trained on (`meta["tile_size"]`, written by training;
        else SMFSR's 64 for 512² crops of the SD3 VAE), with 3/8 overlap (64/24), capped by the positional grid
        (patch_size x pos_embed_max_size latent pixels): a smaller network gets the largest tile it allows.
        """
        grid = b.transformer_config.patch_size * b.transformer_config.pos_embed_max_size
        tile = options.get("tile_size", min(b.meta.get("tile_size", tiling.TILE_SIZE), grid))
        options = {"tile_size": tile, "tile_overlap": tile * tiling.TILE_OVERLAP // tiling.TILE_SIZE, **options}
        return cls(b.transformer_config, b.transformer_params, b.autoencoder_config, b.autoencoder_params,
                   b.null_embeddings, negative_embeddings=b.negative_embeddings,
                   text_encoders_dir=b.text_encoders_dir, **options)

    @property
    def kind(self) -> str:
        return bundle_lib.transformer_kind(self.transformer_config)

    @property
    def call_batch_size(self) -> int:
        """Images per jitted call: batch_size on each device of the mesh."""
        return self.batch_size * self.mesh.size

    def processed_size(self, height: int, width: int) -> tuple[int, int]:
        """(H', W') of the preprocessed LR (and of the SR before the final resize)."""
        width, height = resize_plan(height, width, self.autoencoder_config.downscale, self.upscale,
                                    self.process_size)[-1]
        return height, width

    # ------------------------------------------------------------------------------------------- text

    def _encoders(self):
        if self._text_encoders is None:
            from smfsr_jax.convert.text import load_text_encoders
            self._text_encoders = load_text_encoders(self.text_encoders_dir)
        return self._text_encoders

    def _encode(self, prompt: str) -> tuple[np.ndarray, np.ndarray]:
        if prompt not in self._embedding_cache:
            t5_length = self.null_embeddings[0].shape[0] - text.CLIP_MAX_LENGTH
            if t5_length < 1:
                raise ValueError(f"the NULL embeddings have {self.null_embeddings[0].shape[0]} tokens; captions need "
                                 f"{text.CLIP_MAX_LENGTH} CLIP + n T5 tokens to match them")
            prompt_embeds, pooled = text.encode_prompts(self._encoders(), [prompt], t5_length)
            self._embedding_cache[prompt] = (np.asarray(prompt_embeds[0]), np.asarray(pooled[0]))
        return self._embedding_cache[prompt]

    def _caption_embeddings(self, caption: str | None) -> tuple[np.ndarray, np.ndarray]:
        if caption is None:
            return self.null_embeddings
        if self.text_encoders_dir is None:
            if not self._warned_no_encoders:
                log.warning("captions need text encoders in the bundle; using the NULL embeddings instead")
                self._warned_no_encoders = True
            return self.null_embeddings
        return self._encode(text.postprocess_caption(caption) if self.caption_rule else caption)

    def _negative(self) -> tuple[np.ndarray, np.ndarray]:
        """CFG's unconditional text: stored negative embeddings, else the encoded negative prompt, else NULL."""
        if self.negative_embeddings is not None:
            return self.negative_embeddings
        if self.text_encoders_dir is not None:
            return self._encode(text.NEGATIVE_PROMPT)
        return self.null_embeddings

    # ------------------------------------------------------------------------------------------- sampling

    def _sr_function(self, times: np.ndarray, guidance_scale: float, color_method: str):
        return make_sr_function(self.transformer_config, self.autoencoder_config,
                                times=tuple(float(t) for t in times), guidance_scale=guidance_scale,
                                color_method=color_method, rounding=self.output_rounding, tile_size=self.tile_size,
                                tile_overlap=self.tile_overlap, tile_batch=self.tile_batch, vae_tile=self.vae_tile,
                                mesh=self.mesh)

    def sampler_settings(self, steps: int | None = None,
                         guidance_scale: float | None = None) -> tuple[np.ndarray, float]:
        """(descending time grid, CFG scale) that a call with these arguments samples with."""
        if self.kind == "student":
            if guidance_scale not in (None, 1.0):
                raise ValueError("guidance_scale applies to teacher bundles; SMFSR students sample without CFG")
            return schedules.cosine_grid(STUDENT_STEPS if steps is None else steps), 1.0
        steps = TEACHER_STEPS if steps is None else steps
        guidance_scale = TEACHER_GUIDANCE if guidance_scale is None else float(guidance_scale)
        return schedules.sd3_sampling_sigmas(steps), guidance_scale

    def __call__(self, images, seed: int = 0, steps: int | None = None, caption=None, color_fix: str = "adain", *,
                 indices=None, guidance_scale: float | None = None):
        """x4 SR of one image ((H, W, 3) uint8 or PIL) or a list of them.

        seed/indices: image i uses fold_in(PRNGKey(seed), indices[i]) (default indices 0…n−1). steps: sampling
        steps (default 1 for a student, 40 for a teacher). caption: one string or None for all, or one per
        image. color_fix: 'adain' | 'wavelet' | 'none'. guidance_scale: teacher CFG (default 8).
        """
        single = not isinstance(images, (list, tuple))
        images = [_as_rgb8(image) for image in ([images] if single else images)]
        count = len(images)
        captions = list(caption) if isinstance(caption, (list, tuple)) else [caption] * count
        indices = list(range(count)) if indices is None else [int(i) for i in indices]
        if len(captions) != count or len(indices) != count:
            raise ValueError(f"{count} images but {len(captions)} captions and {len(indices)} indices")
        if color_fix not in color.METHODS:
            raise ValueError(f"color_fix must be one of {color.METHODS}, got {color_fix!r}")
        times, guidance_scale = self.sampler_settings(steps, guidance_scale)
        sr_function = self._sr_function(times, guidance_scale, color_fix)
        negative = self._negative() if guidance_scale > 1.0 else None

        prepared = [prepare_lr(image, self.autoencoder_config.downscale, self.upscale, self.process_size)
                    for image in images]
        groups = {}
        for i, lr in enumerate(prepared):
            groups.setdefault(lr.shape, []).append(i)
        outputs = [None] * count
        size, batch_sharding = self.call_batch_size, mesh_lib.batch_sharding(self.mesh)
        for members in groups.values():
            for start in range(0, len(members), size):
                batch = members[start:start + size]
                padded = batch + [batch[-1]] * (size - len(batch))  # one compiled batch shape
                embeddings = [self._caption_embeddings(captions[i]) for i in padded]
                cond = {samplers.CONTEXT: np.stack([e[0] for e in embeddings]),
                        samplers.POOLED: np.stack([e[1] for e in embeddings])}
                if negative is not None:
                    cond[samplers.NEGATIVE_CONTEXT] = np.broadcast_to(negative[0], cond[samplers.CONTEXT].shape)
                    cond[samplers.NEGATIVE_POOLED] = np.broadcast_to(negative[1], cond[samplers.POOLED].shape)
                inputs = jax.device_put((np.stack([prepared[i] for i in padded]),
                                         image_keys(seed, [indices[i] for i in padded]), cond), batch_sharding)
                sr = np.asarray(sr_function(self.transformer_params, self.autoencoder_params, *inputs))
                for j, i in enumerate(batch):
                    height, width = images[i].shape[:2]
                    target = (width * self.upscale, height * self.upscale)
                    outputs[i] = np.asarray(Image.fromarray(sr[j]).resize(target, Image.BICUBIC))
        return outputs[0] if single else outputs
