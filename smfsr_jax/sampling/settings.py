"""SRSettings: everything besides the model and the image (with its seed, noise index and caption) that decides an
SR output, in one frozen value. It owns every sampling default and the positional-grid limit on latent tiles, and
it is the cache key of the compiled SR functions (canvas.make_canvas_functions, pipeline.make_sr_function).

`SRSettings(**chosen).resolve(transformer_config, autoencoder_config, trained_tile, text_tokens)` (for a loaded
model: `SRModel.resolve(chosen)`) fills what was left None from the model (its kind, its positional grid, the tile
it was trained on, its text length) and the device's memory budget (core/memory.py), and checks the rest, so two
requests that differ only in an explicit default get one compiled function.
"""

import dataclasses

import numpy as np

from smfsr_jax.core import memory, schedules
from smfsr_jax.models import mmdit, vae, vae_tiling
from smfsr_jax.sampling import color, tiling
from smfsr_jax.weights.bundle import transformer_kind

UPSCALE = 4
PROCESS_SIZE = 512  # upstream --process_size: LR sides below PROCESS_SIZE // UPSCALE are upscaled first
STUDENT_STEPS = 1
TEACHER_STEPS, TEACHER_GUIDANCE = 40, 8.0


def positional_grid(config: mmdit.MMDiTConfig) -> int:
    """The largest latent side the MM-DiT's positional table covers: patch_size x pos_embed_max_size."""
    return config.patch_size * config.pos_embed_max_size


@dataclasses.dataclass(frozen=True)
class SRSettings:
    """Sampler, tiling, batching and output settings of SR; None fields take the model's defaults in `resolve`."""
    steps: int | None = None  # sampling steps; None: 1 for a student, 40 for a teacher
    guidance_scale: float | None = None  # teacher CFG; None: 8 (students sample without CFG: 1)
    color_fix: str = "adain"  # color.METHODS
    tile_size: int | None = None  # latent tile side; None: the training size (else 64), capped by the grid
    tile_overlap: int | None = None  # latent tile overlap; None: 3/8 of the tile (SMFSR's 24 of 64)
    tile_batch: int | None = None  # latent tiles per network call; None: as many as the memory budget holds
    vae_tile: int | None = None  # VAE tile side in pixels for larger images (0: never tiled); None: the largest
    # whose untiled pass fits the device's memory budget (vae_tiling.tile_for_budget, core/memory.py)
    output_rounding: str = "truncate"  # color.ROUNDINGS: upstream truncates to 8 bits
    process_size: int = PROCESS_SIZE  # LR sides below process_size / upscale are upscaled first
    upscale: int = UPSCALE
    batch_size: int = 1  # images per device and call
    caption_rule: bool = True  # SMFSR's caption rule (text.postprocess_caption) before encoding

    def resolve(self, transformer_config: mmdit.MMDiTConfig, autoencoder_config: vae.VAEConfig,
                trained_tile: int | None = None, text_tokens: int | None = None) -> "SRSettings":
        """These settings with every None filled for this model, checked; raises ValueError naming a bad one.
        text_tokens (the NULL embeddings' length) sizes the default tile_batch."""
        kind = transformer_kind(transformer_config)
        steps, guidance_scale = self.steps, self.guidance_scale
        if kind == "student":
            if guidance_scale not in (None, 1.0):
                raise ValueError("guidance_scale applies to teacher bundles; SMFSR students sample without CFG")
            steps, guidance_scale = STUDENT_STEPS if steps is None else steps, 1.0
        else:
            steps = TEACHER_STEPS if steps is None else steps
            guidance_scale = TEACHER_GUIDANCE if guidance_scale is None else float(guidance_scale)
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        grid, patch = positional_grid(transformer_config), transformer_config.patch_size
        tile = min(trained_tile or tiling.TILE_SIZE, grid) if self.tile_size is None else self.tile_size
        overlap = tile * tiling.TILE_OVERLAP // tiling.TILE_SIZE if self.tile_overlap is None else self.tile_overlap
        if tile % patch or tile > grid:
            raise ValueError(f"tile_size {tile} must be a multiple of the patch size {patch} and at most {grid} "
                             "(the positional-embedding grid)")
        if not 0 <= overlap < tile:
            raise ValueError(f"tile_overlap must be in [0, tile_size), got {overlap}")
        tile_batch = self.tile_batch
        if tile_batch is None:
            if text_tokens is None:
                raise ValueError("the default tile_batch needs the model's text length (text_tokens)")
            tile_batch = tiling.tile_batch_for_budget(transformer_config, tile, text_tokens, guidance_scale > 1.0,
                                                      memory.activation_budget())
        if self.batch_size < 1 or tile_batch < 1:
            raise ValueError(f"batch_size and tile_batch must be >= 1, got {self.batch_size} and {tile_batch}")
        if self.color_fix not in color.METHODS:
            raise ValueError(f"color_fix must be one of {color.METHODS}, got {self.color_fix!r}")
        if self.output_rounding not in color.ROUNDINGS:
            raise ValueError(f"output_rounding must be one of {color.ROUNDINGS}, got {self.output_rounding!r}")
        vae_tile = self.vae_tile
        if vae_tile is None:
            vae_tile = vae_tiling.tile_for_budget(autoencoder_config, memory.activation_budget())
        if vae_tile < 0 or vae_tile % autoencoder_config.downscale:
            raise ValueError(f"vae_tile must be 0 (off) or a positive multiple of the autoencoder's downscale "
                             f"{autoencoder_config.downscale} pixels, got {vae_tile}")
        return dataclasses.replace(self, steps=int(steps), guidance_scale=guidance_scale, tile_size=tile,
                                   tile_overlap=overlap, tile_batch=tile_batch, vae_tile=vae_tile)

    @property
    def resolved(self) -> bool:
        return None not in (self.steps, self.guidance_scale, self.tile_size, self.tile_overlap, self.tile_batch,
                            self.vae_tile)

    def times(self, kind: str) -> np.ndarray:
        """The descending time grid of resolved settings: the cosine grid (student), SD3's shift-3 sigmas
        (teacher)."""
        if not self.resolved:
            raise ValueError("resolve the settings for a model first (SRSettings.resolve)")
        return schedules.cosine_grid(self.steps) if kind == "student" else schedules.sd3_sampling_sigmas(self.steps)
