r"""A folder of mixed sizes through the SR core on CPU: time to the first image, time per image after it, and how
many functions compile. The SR functions compile per canvas and latent-tile chunk, not per image size
(sampling/canvas.py); README, Compilation, has this before (one fused function per size) and after.

  python benchmarks/mixed_sizes.py [--images 20] [--min_side 24]

A student bundle with the tiny configs' geometry (configs/base.py TINY_MODEL on the wavelet pixel latent) and
seeded random weights; --images LR crops of scikit-image's astronaut, image i of (min_side + 2i) x (min_side + 40
- 2i) pixels, so every size differs; default settings except process_size = 4 x min_side (no image is upscaled
first, so the processed sizes stay distinct); one process on every local device; no persistent compilation cache.
A second pass over the same images shows the per-image time once everything is compiled.

Prints one JSON line: value = seconds for the whole first pass.
"""

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import skimage.data  # noqa: E402

from configs import base  # noqa: E402
from smfsr_jax.core import cache  # noqa: E402
from smfsr_jax.models import mmdit, text, vae  # noqa: E402
from smfsr_jax.sampling.model import SRModel  # noqa: E402
from smfsr_jax.sampling.runner import SRInput, super_resolve  # noqa: E402
from smfsr_jax.sampling.settings import SRSettings  # noqa: E402
from smfsr_jax.weights import bundle as bundle_lib  # noqa: E402

T5_TOKENS = 8


def tiny_student(folder: str) -> SRModel:
    """The tiny geometry's student with seeded random weights (N(0, 0.02²): the timing does not depend on them),
    saved and loaded as a bundle."""
    config = mmdit.MMDiTConfig.tiny_student(**base.TINY_MODEL)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: (0.02 * rng.standard_normal(a.shape)).astype(np.float32),
                          mmdit.abstract_params(config))
    null = (rng.standard_normal((text.CLIP_MAX_LENGTH + T5_TOKENS, config.joint_attention_dim)).astype(np.float32),
            rng.standard_normal((config.pooled_projection_dim,)).astype(np.float32))
    path = bundle_lib.save_bundle(folder, student_config=config, student_params=params,
                                  autoencoder_config=vae.VAEConfig.pixel(downscale=4, latent_channels=48,
                                                                         pixel_basis="wavelet"),
                                  autoencoder_params={}, null_embeddings=null)
    return SRModel.from_checkpoint(path)


def run(model: SRModel, settings: SRSettings, inputs: list[SRInput]) -> list[float]:
    """Seconds from the start to each output."""
    start, done = time.perf_counter(), []
    super_resolve(model, settings, inputs, [0], lambda *_: done.append(time.perf_counter() - start))
    return done


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--min_side", type=int, default=24)
    args = parser.parse_args()
    photo = skimage.data.astronaut()
    sizes = [(args.min_side + 2 * i, args.min_side + 40 - 2 * i) for i in range(args.images)]
    inputs = [SRInput(i, np.ascontiguousarray(photo[100:100 + h, 150:150 + w])) for i, (h, w) in enumerate(sizes)]
    settings = SRSettings(process_size=4 * args.min_side)
    with tempfile.TemporaryDirectory() as folder:
        model = tiny_student(os.path.join(folder, "student"))
        counts = cache.compilation_counts()
        first = run(model, settings, inputs)
        compiled, _ = (now - before for now, before in zip(cache.compilation_counts(), counts))
        again = run(model, settings, inputs)
    per_image = np.diff(first)
    result = {"name": "mixed_sizes", "value": round(first[-1], 2), "unit": f"s for {len(inputs)} images",
              "first_image_s": round(first[0], 3), "per_image_s": round(float(per_image.mean()), 3),
              "compiled_per_image_s": round(float(np.diff(again).mean()), 4),
              "compilations": compiled, "distinct_sizes": len(set(sizes)),
              "config": {"images": len(inputs), "sizes": sizes, "process_size": settings.process_size,
                         "model": "tiny student, random weights", "devices": jax.local_device_count(),
                         "backend": jax.default_backend()}}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
