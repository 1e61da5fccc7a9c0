r"""A full-width SD3-layout VAE with three levels (x4 downscale) through the SR runner with default settings: the
case that ran out of memory when the VAE tile was a fixed pixel count (the whole-image mid-block attention over
256² latent positions of a 1024² output asked for 51.6 GB). Its tile now comes from its geometry and the memory
budget (vae_tiling.tile_for_budget); the untiled pass attends over key chunks, so a 1024² output runs untiled
on a CPU host's budget.

  python benchmarks/default_tiles.py [--lr_side 256]

The VAE (block_out_channels 128, 256, 512, SD3's layout otherwise) and a tiny student MM-DiT on its 16 latent
channels have seeded random weights: the point is memory and that it finishes, not the picture. One LR crop of
scikit-image's astronaut; default SRSettings (process_size 512, so a 256² LR becomes a 1024² output).

Prints one JSON line: value = seconds to the output, with the resolved VAE tile, the canvas and the process's
peak resident memory.
"""

import argparse
import json
import os
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import skimage.data  # noqa: E402

from benchmarks import harness  # noqa: E402
from smfsr_jax.models import mmdit, text, vae  # noqa: E402
from smfsr_jax.sampling import canvas  # noqa: E402
from smfsr_jax.sampling.model import SRModel  # noqa: E402
from smfsr_jax.sampling.pipeline import processed_size  # noqa: E402
from smfsr_jax.sampling.runner import SRInput, super_resolve  # noqa: E402
from smfsr_jax.sampling.settings import SRSettings  # noqa: E402
from smfsr_jax.weights import bundle as bundle_lib  # noqa: E402

THREE_LEVELS = vae.VAEConfig(block_out_channels=(128, 256, 512), downscale=4)
T5_TOKENS = 8


def model_with_three_levels(folder: str) -> SRModel:
    rng = np.random.default_rng(0)
    config = mmdit.MMDiTConfig.tiny_student(in_channels=THREE_LEVELS.latent_channels,
                                            out_channels=THREE_LEVELS.latent_channels)
    params = jax.tree.map(lambda a: (0.02 * rng.standard_normal(a.shape)).astype(np.float32),
                          mmdit.abstract_params(config))
    autoencoder = vae.AutoencoderKL(THREE_LEVELS).init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))["params"]
    null = (rng.standard_normal((text.CLIP_MAX_LENGTH + T5_TOKENS, config.joint_attention_dim)).astype(np.float32),
            rng.standard_normal((config.pooled_projection_dim,)).astype(np.float32))
    path = bundle_lib.save_bundle(folder, student_config=config, student_params=params,
                                  autoencoder_config=THREE_LEVELS, autoencoder_params=autoencoder,
                                  null_embeddings=null)
    return SRModel.from_checkpoint(path)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lr_side", type=int, default=256)
    args = parser.parse_args()
    lr = np.ascontiguousarray(skimage.data.astronaut()[:args.lr_side, :args.lr_side])
    with tempfile.TemporaryDirectory() as folder:
        model = model_with_three_levels(os.path.join(folder, "student"))
        settings = model.resolve(SRSettings())
        processed = processed_size(*lr.shape[:2], settings, THREE_LEVELS.downscale)
        outputs, start = [], time.perf_counter()
        super_resolve(model, SRSettings(), [SRInput(0, lr)], [0], lambda *a: outputs.append(a[2]))
        seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB -> GiB
    print(json.dumps({"name": "default_tiles_three_level_vae", "value": round(seconds, 1), "unit": "s",
                      "output": list(outputs[0].shape), "vae_tile": settings.vae_tile,
                      "canvas": list(canvas.canvas_shape(*processed, settings, THREE_LEVELS.downscale)),
                      "tile_size": settings.tile_size, "peak_rss_gib": round(peak, 2), "lr_side": args.lr_side,
                      **harness.environment()}))


if __name__ == "__main__":
    main()
