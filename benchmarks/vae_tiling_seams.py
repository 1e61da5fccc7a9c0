"""Tiled against whole-image SD3 VAE (random weights, fp32): output differences, seams and run time.

A photograph (scikit-image's astronaut, bicubic to `--size`) is encoded whole and in tiles of `--tile` pixels
(mean latents compared), and the whole-image latents are decoded whole and in tiles. For each it reports the max
and mean absolute difference, and the largest jump between neighbouring pixels across tile borders against the
largest inside tiles (a seam shows as the first exceeding the second), for the tiled and, at the same borders,
the whole output. Convolutions, GroupNorm statistics and the mid-block attention are exact, so the differences
are float rounding and there are no seams. Random weights (kernels ~ 1/sqrt(fan_in)) attend far more broadly
than a trained VAE, a harder case for the attention.

`--width_divisor d` divides the SD3 VAE's block_out_channels by d (4: 32, 64, 128, 128) and keeps everything else
(levels, layers_per_block, 32 groups, the attention): the SD3 layout at CPU cost.

  python benchmarks/vae_tiling_seams.py --size 1024 --tile 512
  python benchmarks/vae_tiling_seams.py --size 2048 --width_divisor 4   # minutes on CPU
  python benchmarks/vae_tiling_seams.py --size 2048 --tile 512 --width_divisor 4 --skip_whole   # seams only
  python benchmarks/vae_tiling_seams.py --size 256 --tile 128 --tiny   # seconds on CPU

`--skip_whole` runs the tiled VAE alone and reports its seams (border against interior jumps): for sizes whose
whole-image run does not fit the machine (at 2048², the whole decoder's mid-block attention alone needs two
65,536² fp32 matrices, 34 GB).

The last line is one JSON object: value = the decoder's max absolute difference; speedup = whole / tiled time.
"""

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import skimage.data  # noqa: E402
from PIL import Image  # noqa: E402

from benchmarks import harness  # noqa: E402
from smfsr_jax.convert.vae import abstract_params  # noqa: E402
from smfsr_jax.models import vae, vae_tiling  # noqa: E402


def random_params(config: vae.VAEConfig, seed: int = 0):
    """Kernels ~ N(0, 1/fan_in), norm scales ~ 1 + N(0, 0.2²), biases ~ N(0, 0.2²)."""
    rng = np.random.default_rng(seed)

    def leaf(path, leaf):
        if jax.tree_util.keystr(path).endswith("['scale']"):
            return (1.0 + 0.2 * rng.standard_normal(leaf.shape)).astype(np.float32)
        if len(leaf.shape) == 1:
            return (0.2 * rng.standard_normal(leaf.shape)).astype(np.float32)
        return (rng.standard_normal(leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))).astype(np.float32)

    return jax.tree_util.tree_map_with_path(leaf, abstract_params(config))


def timed(fn, *args):
    """(result, seconds of one call), compiled ahead of the timed call."""
    compiled = fn.lower(*args).compile()
    start = time.perf_counter()
    result = jax.block_until_ready(compiled(*args))
    return result, time.perf_counter() - start


def compare(tiled, whole, cores) -> dict:
    """Seams of the tiled output and, when the whole-image one exists, the differences from it."""
    across, inside = vae_tiling.border_jumps(tiled, cores)
    result = {"max_abs_output": float(np.abs(np.asarray(tiled)).max()), "jump_across_borders": across,
              "jump_inside_tiles": inside, "seamless": across <= inside}
    if whole is not None:
        diff = np.abs(np.asarray(tiled) - np.asarray(whole))
        whole_across, whole_inside = vae_tiling.border_jumps(whole, cores)
        result.update(max_abs_diff=float(diff.max()), mean_abs_diff=float(diff.mean()),
                      whole_jump_across_borders=whole_across, whole_jump_inside_tiles=whole_inside)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels")
    parser.add_argument("--tile", type=int, default=1024, help="VAE tile in pixels")
    parser.add_argument("--tiny", action="store_true", help="VAEConfig.tiny instead of the SD3 VAE")
    parser.add_argument("--width_divisor", type=int, default=1,
                        help="divide the SD3 VAE's block_out_channels by this (the channels stay multiples of 32)")
    parser.add_argument("--skip_whole", action="store_true", help="tiled only: seams, no whole-image reference")
    args = parser.parse_args()
    if args.tiny:
        config, name = vae.VAEConfig.tiny(), "tiny"
    else:
        channels = tuple(c // args.width_divisor for c in vae.VAEConfig.sd3().block_out_channels)
        config = vae.VAEConfig.sd3(block_out_channels=channels)
        name = "sd3" if args.width_divisor == 1 else f"sd3/{args.width_divisor}"
    params = jax.device_put(random_params(config))
    picture = Image.fromarray(skimage.data.astronaut()).resize((args.size, args.size), Image.BICUBIC)
    images = np.asarray(picture, np.float32)[None] / 127.5 - 1.0
    model = vae.AutoencoderKL(config)
    whole_encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method="encode")[0])
    whole_decode = jax.jit(lambda p, z: model.apply({"params": p}, z, method="decode"))
    tiled_encode = jax.jit(lambda p, x: vae_tiling.encode(p, config, x, args.tile)[0])
    tiled_decode = jax.jit(lambda p, z: vae_tiling.decode(p, config, z, args.tile))

    seconds = {}
    ours_latents, seconds["tiled_encode"] = timed(tiled_encode, params, images)
    latents = decoded = None
    if not args.skip_whole:
        latents, seconds["whole_encode"] = timed(whole_encode, params, images)
    # Both decoders read the same latents: the whole encoder's, or the tiled one's when it did not run.
    ours_decoded, seconds["tiled_decode"] = timed(tiled_decode, params, ours_latents if latents is None else latents)
    if not args.skip_whole:
        decoded, seconds["whole_decode"] = timed(whole_decode, params, latents)
    f = config.downscale
    cores, _ = vae_tiling.tile_grid(args.size, args.size, args.tile, f)
    encode = compare(ours_latents, latents, (cores[0] // f, cores[1] // f))
    decode = compare(ours_decoded, decoded, cores)
    for part, result in (("encode", encode), ("decode", decode)):
        diff = (f"max |diff| {result['max_abs_diff']:.4g}, mean {result['mean_abs_diff']:.4g} " if "max_abs_diff" in result
                else "no whole-image reference ")
        print(f"{part}: {diff}(outputs up to {result['max_abs_output']:.3g}); largest jump across borders "
              f"{result['jump_across_borders']:.4g}, inside tiles {result['jump_inside_tiles']:.4g}")
    print(", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()))
    tiled_s = seconds["tiled_encode"] + seconds["tiled_decode"]
    speedup = None if args.skip_whole else round((seconds["whole_encode"] + seconds["whole_decode"]) / tiled_s, 3)
    print(json.dumps({"name": "vae_tiling_seams", "value": decode.get("max_abs_diff"), "unit": "max |tiled - whole|",
                      "speedup": speedup, "size": args.size, "tile": args.tile,
                      "config": name, "block_out_channels": config.block_out_channels, "dtype": config.dtype,
                      "encode": encode, "decode": decode, "seconds": {k: round(v, 2) for k, v in seconds.items()},
                      **harness.environment()}))


if __name__ == "__main__":
    main()
