"""The batch runner: every SR entry point (`python -m smfsr_jax.sr`, the evaluator, the web app, the demo and
`SRPipeline` for Python callers) runs its images through `super_resolve(model, settings, inputs, seeds, write)`.

Plan: inputs arrive one at a time (read lazily by the caller). Each joins the group of its preprocessed size
(pipeline.processed_size), and a group runs as soon as it holds one call's batch: `settings.batch_size` images
per device of the model's mesh. What is left runs at the end, padded by repeating its last image, so every call
has one batch shape. A batch runs on the canvas of its size (canvas.py): the compiled functions follow the
canvas, not the image size, so a folder of many sizes compiles the MM-DiT once and the VAE once per canvas. A batch is preprocessed once and run once per seed; each output goes
to `write(input, seed, image)` when its batch is done, so a caller saves, scores or shows it and the runner holds
at most one unfinished batch per size.

Devices: each call is split over every device of the model's mesh (SRModel(devices=)); each device runs whole
images. Processes: the runner never talks to other processes. With several (sr.py, evaluate.py), each gives it
its own share of the inputs (core/distributed.share: the inputs k with k % n == p); the noise index k of each
input keeps the union of their outputs that of one process.

Captions: with text encoders in the model, a caption goes through SMFSR's caption rule (unless
settings.caption_rule is False) and the SD3 encoders; without encoders, and for None, the NULL embeddings are
used (sampling/model.py).
"""

import dataclasses
from typing import Any, Callable, Iterable, Sequence

import jax
import numpy as np
from PIL import Image

from smfsr_jax.core import mesh as mesh_lib
from smfsr_jax.sampling import canvas
from smfsr_jax.sampling.model import SRModel
from smfsr_jax.sampling.pipeline import image_keys, prepare_lr, processed_size
from smfsr_jax.sampling.settings import SRSettings
from smfsr_jax.weights import bundle as bundle_lib


@dataclasses.dataclass(frozen=True)
class SRInput:
    """One LR image to super-resolve."""
    index: int  # the noise index k: image k is sampled with fold_in(PRNGKey(seed), k)
    pixels: np.ndarray  # (H, W, 3) uint8 RGB
    caption: str | None = None  # None: the NULL embeddings
    tag: Any = None  # the caller's own, handed back to `write` with the output


def super_resolve(model: SRModel, settings: SRSettings, inputs: Iterable[SRInput], seeds: Sequence[int],
                  write: Callable[[SRInput, int, np.ndarray], None]) -> None:
    """x4 SR of `inputs` for each seed; write(input, seed, (4H, 4W, 3) uint8) receives every output (module
    docstring). `settings` may leave defaults None: they are resolved for `model` here."""
    settings = model.resolve(settings)
    functions = canvas.make_canvas_functions(model.transformer_config, model.autoencoder_config, settings,
                                             model.mesh)
    times = settings.times(model.kind)
    multiple, size = model.autoencoder_config.downscale, settings.batch_size * model.mesh.size
    sharding = mesh_lib.batch_sharding(model.mesh)
    replicated = mesh_lib.replicated(model.mesh)

    def run(batch: list[SRInput]):
        padded = batch + [batch[-1]] * (size - len(batch))  # one compiled batch shape
        lr_images = np.stack([prepare_lr(item.pixels, multiple, settings.upscale, settings.process_size)
                              for item in padded])
        processed = lr_images.shape[1:3]
        lr_canvas = np.zeros((size, *canvas.canvas_shape(*processed, settings, multiple), 3), np.uint8)
        lr_canvas[:, :processed[0], :processed[1]] = lr_images
        cond = model.condition([item.caption for item in padded], settings.caption_rule,
                               guided=settings.guidance_scale > 1.0)
        lr_canvas, cond = jax.device_put(lr_canvas, sharding), jax.device_put(cond, replicated)
        for seed in seeds:
            keys = jax.device_put(image_keys(seed, [item.index for item in padded]), sharding)
            sr = canvas.sample(functions, model.transformer_params, model.autoencoder_params, lr_canvas,
                               processed, keys, cond, times, settings, model.transformer_config.patch_size,
                               multiple, sharding)[:, :processed[0], :processed[1]]
            for item, image in zip(batch, sr):
                height, width = item.pixels.shape[:2]
                target = (width * settings.upscale, height * settings.upscale)
                write(item, seed, np.asarray(Image.fromarray(image).resize(target, Image.BICUBIC)))

    pending = {}  # preprocessed size -> the inputs waiting for a full batch
    for item in inputs:
        shape = processed_size(*item.pixels.shape[:2], settings, multiple)
        pending.setdefault(shape, []).append(item)
        if len(pending[shape]) == size:
            run(pending.pop(shape))
    for group in pending.values():
        run(group)


def _as_rgb8(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"images must be (H, W, 3) uint8 RGB arrays or PIL images, got {image.shape} {image.dtype}")
    return image


class SRPipeline:
    """x4 SR of images in memory: a loaded model (SRModel) with resolved settings (SRSettings).

    `SRPipeline.from_checkpoint(bundle_dir)(image, seed=0)` -> (4H, 4W, 3) uint8; a list of images gives a list.
    Settings are keywords of the constructors (batch_size, tile_size, process_size, ...).
    """

    def __init__(self, model: SRModel, settings: SRSettings = SRSettings()):
        self.model = model
        self.settings = model.resolve(settings)

    @classmethod
    def from_bundle(cls, bundle: bundle_lib.Bundle, *, devices=None, **settings) -> "SRPipeline":
        """A loaded bundle (or a training checkpoint from training.inference.load_checkpoint)."""
        return cls(SRModel(bundle, devices), SRSettings(**settings))

    @classmethod
    def from_checkpoint(cls, path: str, *, dtype: str | None = None, attention: str | None = None, devices=None,
                        **settings) -> "SRPipeline":
        """A bundle directory; dtype/attention override the transformer config (SRModel.from_checkpoint)."""
        return cls(SRModel.from_checkpoint(path, dtype=dtype, attention=attention, devices=devices),
                   SRSettings(**settings))

    @classmethod
    def from_pretrained(cls, model: str, base: str, *, null_embeddings: str | None = None,
                        lr_key_bug: bool | None = None, cache_dir: str | None = None, dtype: str | None = None,
                        attention: str | None = None, devices=None, **settings) -> "SRPipeline":
        """Released weights (SRModel.from_pretrained)."""
        loaded = SRModel.from_pretrained(model, base, null_embeddings=null_embeddings, lr_key_bug=lr_key_bug,
                                         cache_dir=cache_dir, dtype=dtype, attention=attention, devices=devices)
        return cls(loaded, SRSettings(**settings))

    def __call__(self, images, seed: int = 0, steps: int | None = None, caption=None, color_fix: str | None = None,
                 *, indices=None, guidance_scale: float | None = None):
        """x4 SR of one image ((H, W, 3) uint8 or PIL) or a list of them.

        seed/indices: image i uses fold_in(PRNGKey(seed), indices[i]) (default indices 0…n−1). caption: one string
        or None for all, or one per image. steps, color_fix, guidance_scale: this call's, else the settings'.
        """
        single = not isinstance(images, (list, tuple))
        images = [_as_rgb8(image) for image in ([images] if single else images)]
        count = len(images)
        captions = list(caption) if isinstance(caption, (list, tuple)) else [caption] * count
        indices = list(range(count)) if indices is None else [int(i) for i in indices]
        if len(captions) != count or len(indices) != count:
            raise ValueError(f"{count} images but {len(captions)} captions and {len(indices)} indices")
        changes = {name: value for name, value in (("steps", steps), ("color_fix", color_fix),
                                                   ("guidance_scale", guidance_scale)) if value is not None}
        outputs = [None] * count
        inputs = [SRInput(index, pixels, text, tag=i)
                  for i, (index, pixels, text) in enumerate(zip(indices, images, captions))]

        def keep(item, _, image):
            outputs[item.tag] = image

        super_resolve(self.model, dataclasses.replace(self.settings, **changes), inputs, [seed], keep)
        return outputs[0] if single else outputs
