r"""The SR runner's canvas path (sampling/canvas.py: one set of compiled functions for any size) against the fused
per-size SR function (pipeline.make_sr_function), on the held-back photographs at mixed sizes: how far the
outputs move, and where.

  python benchmarks/any_size.py                                   # tiny student, seeded random weights
  python benchmarks/any_size.py --bundle workdirs/demo/student_gan/bundle --tile_size 8
  python benchmarks/any_size.py --padding edge                    # latents shorter than the tile: repeat the edge

Images: crops of the held-back photographs (scikit-image's chelsea and coffee, never trained on by the demo) at
`--sizes` LR sizes, each the top-left corner's crop; `process_size` 4 x the smallest side (nothing upscaled
first). For each image: the 8-bit output difference (max, mean), whether its latent is at least a tile each way
(there the paths tile alike and differ by float rounding), and the mean difference near the bottom and right
borders of the image (the last quarter tile, where a short latent is extended) against the rest.

Prints one JSON line: value = the largest difference over images whose latents are at least a tile each way.
"""

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import numpy as np  # noqa: E402
import skimage.data  # noqa: E402
from PIL import Image  # noqa: E402

from benchmarks import harness  # noqa: E402
from benchmarks.mixed_sizes import tiny_student  # noqa: E402
from smfsr_jax.sampling import canvas, pipeline  # noqa: E402
from smfsr_jax.sampling.model import SRModel  # noqa: E402
from smfsr_jax.sampling.runner import SRInput, super_resolve  # noqa: E402
from smfsr_jax.sampling.settings import SRSettings  # noqa: E402

SIZES = "24x64,30x58,36x52,42x46,48x40,54x34,60x28,70x90,96x64"
PHOTOGRAPHS = ("chelsea", "coffee")


def fused_outputs(model: SRModel, settings: SRSettings, inputs: list[SRInput], seed: int) -> list[np.ndarray]:
    """The fused per-size SR function's x4 outputs (one compilation per size)."""
    settings = model.resolve(settings)
    fused = pipeline.make_sr_function(model.transformer_config, model.autoencoder_config, settings, model.mesh)
    cond = model.condition([None] * model.mesh.size, settings.caption_rule, guided=settings.guidance_scale > 1.0)
    outputs = []
    for item in inputs:
        lr = pipeline.prepare_lr(item.pixels, model.autoencoder_config.downscale, settings.upscale,
                                 settings.process_size)
        batch = np.repeat(lr[None], model.mesh.size, axis=0)
        keys = pipeline.image_keys(seed, [item.index] * model.mesh.size)
        sr = np.asarray(fused(model.transformer_params, model.autoencoder_params, batch, keys, cond))[0]
        height, width = item.pixels.shape[:2]
        outputs.append(np.asarray(Image.fromarray(sr).resize((4 * width, 4 * height), Image.BICUBIC)))
    return outputs


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default=None, help="a bundle directory (default: the tiny random student)")
    parser.add_argument("--sizes", default=SIZES, help="comma list of LR HxW")
    parser.add_argument("--tile_size", type=int, default=None, help="latent tile (default: the bundle's)")
    parser.add_argument("--padding", choices=("reflect", "edge"), default=canvas.LATENT_PADDING)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    canvas.LATENT_PADDING = args.padding
    sizes = [tuple(int(v) for v in size.split("x")) for size in args.sizes.split(",")]
    photos = [getattr(skimage.data, name)() for name in PHOTOGRAPHS]
    inputs = [SRInput(i, np.ascontiguousarray(photos[i % len(photos)][:h, :w, :3])) for i, (h, w) in enumerate(sizes)]
    settings = SRSettings(process_size=4 * min(min(size) for size in sizes), tile_size=args.tile_size)
    with tempfile.TemporaryDirectory() as folder:
        model = SRModel.from_checkpoint(args.bundle) if args.bundle else tiny_student(os.path.join(folder, "s"))
        resolved = model.resolve(settings)
        ours = {}
        super_resolve(model, settings, inputs, [args.seed], lambda item, _, image: ours.__setitem__(item.index, image))
        reference = fused_outputs(model, settings, inputs, args.seed)
    f, tile = model.autoencoder_config.downscale, resolved.tile_size
    cases = []
    for item, want in zip(inputs, reference):
        difference = np.abs(ours[item.index].astype(np.int16) - want.astype(np.int16))
        height, width = item.pixels.shape[:2]
        processed = pipeline.processed_size(height, width, resolved, f)
        latent = (processed[0] // f, processed[1] // f)
        band = max(1, round(tile * f / 4 * 4 * height / processed[0]))  # a quarter tile, in output pixels
        border = np.zeros(difference.shape[:2], bool)
        border[-band:], border[:, -band:] = True, True
        cases.append({"lr": [height, width], "latent": list(latent), "at_least_a_tile": min(latent) >= tile,
                      "max": int(difference.max()), "mean": round(float(difference.mean()), 4),
                      "mean_near_border": round(float(difference[border].mean()), 4),
                      "mean_inside": round(float(difference[~border].mean()), 4)})
        print(json.dumps(cases[-1]), flush=True)
    tiled_alike = [case["max"] for case in cases if case["at_least_a_tile"]]
    print(json.dumps({"name": "any_size_difference", "value": max(tiled_alike) if tiled_alike else None,
                      "unit": "8-bit levels, latents at least a tile", "padding": args.padding,
                      "tile_size": tile, "tile_overlap": resolved.tile_overlap, "process_size": resolved.process_size,
                      "model": args.bundle or "tiny student, random weights", "cases": cases,
                      **harness.environment()}))


if __name__ == "__main__":
    main()
