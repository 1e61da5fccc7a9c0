"""Compile (without running) the one-step x4 SR function at several sizes, VAE tiled and whole; print XLA's memory
analysis.

Every input is abstract (jax.ShapeDtypeStruct): no weights are loaded and nothing is allocated. `--parts sr`
compiles the whole SR function of `SRPipeline` (SMFSR student on the SD3.5-Medium MM-DiT with its latent
tiling, SD3 VAE, bf16); `--parts vae` compiles the VAE encode and decode functions alone (the part that tiling
changes; the latent-tiled transformer runs a fixed tile shape whatever the image); `--parts canvas` compiles
what the SR runner compiles (sampling/canvas.py): the MM-DiT on one chunk of `--tile_batch` latent tiles, once,
and the VAE encode and decode on each size's canvas. Cases are LR sides (`--sizes`; the SR and VAE side is 4x),
each with `--vae_tile` and with the VAE whole (vae_tile 0). On CPU the figures are the CPU compiler's buffer
assignment, a close proxy for a GPU's.

  python benchmarks/sr_memory.py --parts vae --sizes 128,512,1024
  python benchmarks/sr_memory.py --parts sr --sizes 128,512 --vae_tile 512
  python benchmarks/sr_memory.py --parts canvas --sizes 128,256,512
  python benchmarks/sr_memory.py --tiny            # tiny networks and sizes: a check of the script

The last line is one JSON object: value = tiled temporaries at the largest size over those at the smallest
(whole) size, speedup = whole / tiled temporaries at the largest size, every case in `cases`.
"""

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks import harness  # noqa: E402
from smfsr_jax.convert.vae import abstract_params as vae_abstract_params  # noqa: E402
from smfsr_jax.models import mmdit, vae, vae_tiling  # noqa: E402
from smfsr_jax.core import mesh as mesh_lib  # noqa: E402
from smfsr_jax.sampling import canvas, pipeline, samplers, tiling  # noqa: E402
from smfsr_jax.sampling.settings import SRSettings  # noqa: E402
from smfsr_jax.training.stages.stage import shapes  # noqa: E402

TINY_TEXT_TOKENS = 8
# The full-size cases' VAE tile, fixed so that figures compare across machines: 2048² outputs run in 2 x 2 tiles
# (the CPU budget's tile, 1472 for the SD3 VAE, cuts them the same way).
VAE_TILE = 1024
TINY_VAE_TILE = 32


def networks(tiny: bool, dtype: str):
    if tiny:
        return (mmdit.MMDiTConfig.tiny_student(dtype=dtype), vae.VAEConfig.tiny(dtype=dtype), TINY_TEXT_TOKENS)
    return (mmdit.MMDiTConfig.smfsr_student(dtype=dtype), vae.VAEConfig.sd3(dtype=dtype),
            harness.TEXT_TOKENS)


def analyse(fn, *args) -> dict:
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    mem = compiled.memory_analysis()
    mib = lambda n: round(n / 2 ** 20, 1)  # noqa: E731
    return {"temporaries_mib": mib(mem.temp_size_in_bytes), "arguments_mib": mib(mem.argument_size_in_bytes),
            "outputs_mib": mib(mem.output_size_in_bytes), "compile_seconds": round(time.perf_counter() - start, 1)}


def vae_cases(ae_cfg, dtype, side: int, batch: int, vae_tile: int) -> dict:
    params = shapes(vae_abstract_params(ae_cfg), dtype)
    images = jax.ShapeDtypeStruct((batch, side, side, 3), jnp.float32)
    latents = jax.ShapeDtypeStruct((batch, side // ae_cfg.downscale, side // ae_cfg.downscale,
                                    ae_cfg.latent_channels), jnp.float32)
    return {"encode": analyse(lambda p, x: vae_tiling.encode(p, ae_cfg, x, vae_tile), params, images),
            "decode": analyse(lambda p, z: vae_tiling.decode(p, ae_cfg, z, vae_tile), params, latents)}


def sr_function(tcfg, ae_cfg, tokens, dtype, side: int, batch: int, vae_tile: int):
    """(the one-step SR function, its abstract arguments) for `batch` LR images of side `side` / 4."""
    settings = SRSettings(steps=1, tile_batch=tiling.TILE_BATCH, vae_tile=vae_tile).resolve(tcfg, ae_cfg)
    sr = pipeline.make_sr_function(tcfg, ae_cfg, settings)
    cond = {samplers.CONTEXT: jax.ShapeDtypeStruct((batch, tokens, tcfg.joint_attention_dim), jnp.float32),
            samplers.POOLED: jax.ShapeDtypeStruct((batch, tcfg.pooled_projection_dim), jnp.float32)}
    args = (shapes(mmdit.abstract_params(tcfg), dtype), shapes(vae_abstract_params(ae_cfg), dtype),
            jax.ShapeDtypeStruct((batch, side, side, 3), jnp.uint8), jax.ShapeDtypeStruct((batch, 2), jnp.uint32),
            cond)
    return sr, args


def canvas_functions(tcfg, ae_cfg, vae_tile: int, tile_batch: int):
    settings = SRSettings(steps=1, tile_batch=tile_batch, vae_tile=vae_tile).resolve(tcfg, ae_cfg)
    mesh = mesh_lib.make_mesh([(canvas.DATA, 1)], jax.devices()[:1])
    return settings, canvas.make_canvas_functions(tcfg, ae_cfg, settings, mesh)


def velocity_case(tcfg, ae_cfg, tokens, dtype, tile_batch: int) -> dict:
    """The MM-DiT on one chunk of latent tiles: compiled once for every image size."""
    settings, functions = canvas_functions(tcfg, ae_cfg, VAE_TILE, tile_batch)
    tiles = jax.ShapeDtypeStruct((tile_batch, settings.tile_size, settings.tile_size, tcfg.in_channels), jnp.float32)
    cond = {samplers.CONTEXT: jax.ShapeDtypeStruct((1, tokens, tcfg.joint_attention_dim), jnp.float32),
            samplers.POOLED: jax.ShapeDtypeStruct((1, tcfg.pooled_projection_dim), jnp.float32)}
    time = jax.ShapeDtypeStruct((), jnp.float32)
    return analyse(functions.velocity, shapes(mmdit.abstract_params(tcfg), dtype), tiles, tiles, cond,
                   jax.ShapeDtypeStruct((tile_batch,), jnp.int32), time, time)


def canvas_case(tcfg, ae_cfg, dtype, side: int, batch: int, vae_tile: int) -> dict:
    """The VAE encode and decode on the canvas of a side x side image (its size traced)."""
    settings, functions = canvas_functions(tcfg, ae_cfg, vae_tile, tiling.TILE_BATCH)
    rows, columns = canvas.canvas_shape(side, side, settings, ae_cfg.downscale)
    f = ae_cfg.downscale
    params, size = shapes(vae_abstract_params(ae_cfg), dtype), jax.ShapeDtypeStruct((2,), jnp.int32)
    lr_canvas = jax.ShapeDtypeStruct((batch, rows, columns, 3), jnp.uint8)
    latents = jax.ShapeDtypeStruct((batch, rows // f, columns // f, ae_cfg.latent_channels), jnp.float32)
    return {"encode": analyse(functions.encode, params, lr_canvas, size, jax.ShapeDtypeStruct((batch, 2), jnp.uint32)),
            "decode": analyse(functions.decode, params, latents, lr_canvas, size), "canvas": [rows, columns]}


def sr_case(tcfg, ae_cfg, tokens, dtype, side: int, batch: int, vae_tile: int) -> dict:
    fn, args = sr_function(tcfg, ae_cfg, tokens, dtype, side, batch, vae_tile)
    return {"sr": analyse(fn, *args)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", choices=("vae", "sr", "canvas"), default="vae")
    parser.add_argument("--tile_batch", type=int, default=1, help="latent tiles a chunk (--parts canvas)")
    parser.add_argument("--sizes", default=None, help="comma list of LR sides (default 128,512,1024; tiny 8,16,32)")
    parser.add_argument("--vae_tile", type=int, default=None,
                        help=f"VAE tile in pixels (default {VAE_TILE}; tiny {TINY_VAE_TILE})")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--tiny", action="store_true", help="tiny networks and sizes (CPU check of the script)")
    args = parser.parse_args()
    sizes = [int(s) for s in (args.sizes or ("8,16,32" if args.tiny else "128,512,1024")).split(",")]
    vae_tile = args.vae_tile if args.vae_tile is not None else TINY_VAE_TILE if args.tiny else VAE_TILE
    tcfg, ae_cfg, tokens = networks(args.tiny, args.dtype)
    dtype = jnp.dtype(args.dtype)
    cases, velocity = [], None
    if args.parts == "canvas":
        velocity = velocity_case(tcfg, ae_cfg, tokens, dtype, args.tile_batch)
        print(f"MM-DiT on {args.tile_batch} latent tiles: temporaries {velocity['temporaries_mib']} MiB, arguments "
              f"{velocity['arguments_mib']} MiB ({velocity['compile_seconds']} s)", flush=True)
    for lr_side in sizes:
        side = 4 * lr_side
        for tile in (vae_tile, 0):
            if args.parts == "vae":
                parts = vae_cases(ae_cfg, dtype, side, args.batch, tile)
            elif args.parts == "canvas":
                parts = canvas_case(tcfg, ae_cfg, dtype, side, args.batch, tile)
            else:
                parts = sr_case(tcfg, ae_cfg, tokens, dtype, side, args.batch, tile)
            case = {"lr_side": lr_side, "side": side, "vae_tile": tile,
                    "tiled": vae_tiling.needs_tiling(*parts.get("canvas", (side, side)), tile), **parts}
            compiled = {name: part for name, part in parts.items() if isinstance(part, dict)}
            case["temporaries_mib"] = max(part["temporaries_mib"] for part in compiled.values())
            print(f"LR {lr_side}² -> {side}², vae_tile {tile}{', canvas ' + str(parts['canvas']) if 'canvas' in parts else ''}: "
                  + ", ".join(f"{name} temporaries {p['temporaries_mib']} MiB, arguments {p['arguments_mib']} MiB, "
                              f"outputs {p['outputs_mib']} MiB ({p['compile_seconds']} s)"
                              for name, p in compiled.items()), flush=True)
            cases.append(case)
    base = cases[0]["temporaries_mib"]  # the smallest size, whole (or tiled: it fits one tile)
    largest_tiled, largest_whole = cases[-2]["temporaries_mib"], cases[-1]["temporaries_mib"]
    print(json.dumps({"name": f"sr_memory_{args.parts}", "value": round(largest_tiled / base, 2),
                      "unit": "x smallest-size temporaries", "speedup": round(largest_whole / largest_tiled, 2),
                      "parts": args.parts, "dtype": args.dtype, "batch": args.batch, "vae_tile": vae_tile,
                      "tiny": args.tiny, "velocity": velocity, "cases": cases, **harness.environment()}))


if __name__ == "__main__":
    main()
