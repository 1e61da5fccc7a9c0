"""SR of any image size with a fixed set of compiled functions (docs/design.md#one-compilation-for-any-size).

The fused SR function (pipeline.make_sr_function) is one XLA program per image size, so a folder of N sizes
compiles N times. Here SR runs as three functions whose shapes do not follow the image:

- `encode` and `decode` run on a *canvas*: the preprocessed LR image at the top left of a fixed-size array whose
  sides come from a short ladder (`canvas_side`). The image's size is an argument (traced), and the autoencoder,
  the noise and the colour fix see only the image: the VAE masks what lies outside it (vae_tiling's `size`), the
  noise is the draw of the image's own latent shape laid on the canvas (`flat_normal`), the colour fix takes its
  statistics inside it. One pair compiles per canvas size in use, never per image size.
- `velocity` runs the MM-DiT on chunks of latent tiles of the settings' tile side, a power of two tiles a device
  up to settings.tile_batch (`chunk_sizes`: no tile is padded, and at most log2(tile_batch) + 1 shapes compile,
  whatever the images). The host cuts the tiles (tiling.tile_layout, the origins and Gaussian
  blend of the fused path), runs the chunks, blends the velocities and takes the Euler step in numpy: latents are
  small next to the network, so the transfers cost little against one MM-DiT call.

A latent with a side shorter than the tile (only with a tile larger than process_size / downscale, e.g. the
tiny test models) is extended to the tile by `LATENT_PADDING` before it is cut, and its velocity is cropped back:
the one place where the result differs from the fused path by more than float rounding (benchmarks/any_size.py
measures it). Latents at least a tile on each side are tiled as the fused path tiles them.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from smfsr_jax.core import images
from smfsr_jax.models import mmdit, vae, vae_tiling
from smfsr_jax.sampling import color, samplers, tiling
from smfsr_jax.sampling.pipeline import DATA, POSTERIOR_STREAM
from smfsr_jax.sampling.settings import SRSettings
from smfsr_jax.weights import bundle as bundle_lib

LATENT_PADDING = "reflect"  # how a latent shorter than the tile is extended: "reflect" or "edge"


def canvas_side(side: int, unit: int, multiple: int, extra: int = 0) -> int:
    """The smallest canvas side >= side on the ladder unit x {1, 1.5} x 2^k (a side is padded by less than half
    of itself), rounded up to `multiple`; `extra` (if > 0) is one more rung."""
    rung, double = unit, False
    while rung < side:
        rung, double = (rung * 3 // 2, True) if not double else (rung * 4 // 3, False)
    rung = -(-rung // multiple) * multiple
    return extra if side <= extra < rung else rung


def canvas_shape(height: int, width: int, settings: SRSettings, downscale: int) -> tuple[int, int]:
    """(rows, columns) in pixels of the canvas of a preprocessed image: at least one latent tile each way, on the
    ladder of unit = tile side x downscale, with the VAE tile as one more rung (a canvas just above it would run
    the VAE in tiles, at ~12x the cost of one pass)."""
    unit = settings.tile_size * downscale
    return tuple(canvas_side(side, unit, downscale, settings.vae_tile) for side in (height, width))


def flat_normal(key, valid, shape, dtype=jnp.float32):
    """normal(key, (rows, columns, C)) for valid = (rows, columns) (traced), at the top left of a `shape` canvas
    (zeros elsewhere): JAX's draws are laid out flat by index and prefix-stable, so this equals the image's own
    draw whatever the canvas."""
    height, width, channels = shape
    flat = jax.random.normal(key, (height * width * channels,), dtype)
    rows, cols = jnp.arange(height)[:, None, None], jnp.arange(width)[None, :, None]
    inside = (rows < valid[0]) & (cols < valid[1])
    index = (rows * valid[1] + cols) * channels + jnp.arange(channels)
    return jnp.where(inside, flat[jnp.where(inside, index, 0)], 0)


def extend(latents: np.ndarray, height: int, width: int, mode: str) -> np.ndarray:
    """(B, H, W, C) canvas whose first (height, width) hold a latent -> the canvas with the rest filled from the
    latent by `mode` ("reflect": mirrored about the last row and column, "edge": repeated)."""
    def source(size, length):
        index = np.arange(length)
        if mode == "edge" or size == 1:
            return np.minimum(index, size - 1)
        period = 2 * (size - 1)
        index = index % period
        return np.where(index < size, index, period - index)
    if mode not in ("reflect", "edge"):
        raise ValueError(f"latent padding must be 'reflect' or 'edge', got {mode!r}")
    return latents[:, source(height, latents.shape[1])][:, :, source(width, latents.shape[2])]


@dataclasses.dataclass(frozen=True)
class CanvasFunctions:
    """The compiled parts of canvas SR for one model and resolved settings (see the module docstring)."""
    encode: object  # (autoencoder params, lr canvas uint8 (B, H, W, 3), size (2,), keys (B, 2)) -> (ε, z_lr)
    velocity: object  # (transformer params, z tiles, lr tiles, cond, image index, t, r) -> velocity tiles
    decode: object  # (autoencoder params, latents, lr canvas, size) -> SR canvas uint8


def make_canvas_functions(transformer_config: mmdit.MMDiTConfig, autoencoder_config: vae.VAEConfig,
                          settings: SRSettings, mesh: jax.sharding.Mesh) -> CanvasFunctions:
    """The jitted encode, velocity and decode for resolved `settings`, split over the mesh's DATA axis (images
    for encode and decode, tiles for velocity; parameters and conditioning replicated). Each is cached on what it
    depends on only, so that a change of colour fix compiles no new MM-DiT."""
    if not settings.resolved:
        raise ValueError("make_canvas_functions needs resolved settings (SRSettings.resolve)")
    return CanvasFunctions(
        encode=_encode_function(autoencoder_config, settings.vae_tile, mesh),
        velocity=_velocity_function(transformer_config, settings.guidance_scale, mesh),
        decode=_decode_function(autoencoder_config, settings.vae_tile, settings.color_fix, settings.output_rounding,
                                mesh))


@functools.lru_cache(maxsize=None)
def _encode_function(autoencoder_config: vae.VAEConfig, vae_tile: int, mesh: jax.sharding.Mesh):
    f = autoencoder_config.downscale

    def encode(autoencoder_params, lr_canvas, size, keys):
        mean, logvar = vae_tiling.encode(autoencoder_params, autoencoder_config, images.to_signed(lr_canvas),
                                         vae_tile, size)
        latent = (size[0] // f, size[1] // f)

        def draw(keys, dtype):
            return jax.vmap(lambda key: flat_normal(key, latent, mean.shape[1:], dtype))(keys)
        posterior_keys = jax.vmap(lambda key: jax.random.fold_in(key, POSTERIOR_STREAM))(keys)
        lr_latents = mean + jnp.exp(0.5 * logvar) * draw(posterior_keys, mean.dtype)
        return draw(keys, jnp.float32), vae.normalize_latents(lr_latents, autoencoder_config)

    return jax.jit(jax.shard_map(encode, mesh=mesh, in_specs=(P(), P(DATA), P(), P(DATA)),
                                 out_specs=(P(DATA), P(DATA))))


@functools.lru_cache(maxsize=None)
def _velocity_function(transformer_config: mmdit.MMDiTConfig, guidance_scale: float, mesh: jax.sharding.Mesh):
    network = mmdit.MMDiT(transformer_config)
    student = bundle_lib.transformer_kind(transformer_config) == "student"

    def velocity(transformer_params, z_tiles, lr_tiles, cond, index, t, r):
        apply_fn = functools.partial(network.apply, {"params": transformer_params})
        velocity_fn = (samplers.student_velocity(apply_fn) if student
                       else samplers.teacher_velocity(apply_fn, guidance_scale))
        return velocity_fn(z_tiles, lr_tiles, jax.tree.map(lambda a: jnp.take(a, index, axis=0), cond), t, r)

    return jax.jit(jax.shard_map(velocity, mesh=mesh, in_specs=(P(), P(DATA), P(DATA), P(), P(DATA), P(), P()),
                                 out_specs=P(DATA)))


@functools.lru_cache(maxsize=None)
def _decode_function(autoencoder_config: vae.VAEConfig, vae_tile: int, color_fix: str, rounding: str,
                     mesh: jax.sharding.Mesh):
    def decode(autoencoder_params, latents, lr_canvas, size):
        decoded = vae_tiling.decode(autoencoder_params, autoencoder_config,
                                    vae.denormalize_latents(latents, autoencoder_config), vae_tile, size)
        return color.color_fix(images.from_signed(decoded), lr_canvas, color_fix, rounding, size)

    return jax.jit(jax.shard_map(decode, mesh=mesh, in_specs=(P(), P(DATA), P(DATA), P()), out_specs=P(DATA)))


def chunk_sizes(rows: int, tile_batch: int) -> list[int]:
    """Tiles per call (per device) covering `rows` tiles: the largest power of two <= tile_batch while it fits,
    then the binary digits of the rest (13 tiles at 8: [8, 4, 1])."""
    largest = 1 << (tile_batch.bit_length() - 1)
    sizes = [largest] * (rows // largest)
    rest = rows % largest
    return sizes + [1 << bit for bit in reversed(range(rest.bit_length())) if rest >> bit & 1]


def tile_plan(height: int, width: int, settings: SRSettings, patch_size: int):
    """(layout, per-tile weight (T, T), per-pixel normaliser (height', width')) of a (height, width) latent,
    extended to at least one tile each way. A single tile blends with weight one, so its velocity passes
    unchanged (as the fused path runs such a latent whole)."""
    layout = tiling.tile_layout(max(height, settings.tile_size), max(width, settings.tile_size),
                                settings.tile_size, settings.tile_overlap, patch_size)
    if len(layout.boxes) == 1:
        ones = np.ones((layout.tile, layout.tile), np.float32)
        return layout, ones, ones
    return layout, layout.weights, layout.weight_sum()


def sample(functions: CanvasFunctions, transformer_params, autoencoder_params, lr_canvas, size: tuple[int, int],
           keys, cond, times, settings: SRSettings, patch_size: int, downscale: int, sharding) -> np.ndarray:
    """SR of one batch of preprocessed LR images of one `size` (pixels) on `lr_canvas` (B, H, W, 3) uint8 (device,
    split over the mesh): the SR canvas (B, H, W, 3) uint8 on the host; its top-left `size` is the output."""
    size_array = np.asarray(size, np.int32)
    noise, lr_latents = functions.encode(autoencoder_params, lr_canvas, size_array, keys)
    height, width = size[0] // downscale, size[1] // downscale
    z, lr_latents = (extend(np.asarray(a), height, width, LATENT_PADDING) for a in (noise, lr_latents))
    layout, weights, weight_sum = tile_plan(height, width, settings, patch_size)
    tile, batch = layout.tile, z.shape[0]
    rows = [(b, y, x) for y, x in layout.boxes for b in range(batch)]  # tile-major, as the fused path blends
    devices = sharding.mesh.size
    starts = np.cumsum([0] + [devices * c for c in chunk_sizes(-(-len(rows) // devices), settings.tile_batch)])
    rows = rows + [rows[-1]] * (starts[-1] - len(rows))  # a whole number of tiles per device
    normaliser = np.ones(z.shape[1:3], np.float32)
    normaliser[:weight_sum.shape[0], :weight_sum.shape[1]] = weight_sum
    normaliser[height:], normaliser[:, width:] = 1.0, 1.0  # outside the latent the velocity is zero
    times = np.asarray(times, np.float32)
    for t, r in zip(times[:-1], times[1:]):
        pending = []
        for start, stop in zip(starts[:-1], starts[1:]):
            part = rows[start:stop]
            z_tiles = np.stack([z[b, y:y + tile, x:x + tile] for b, y, x in part])
            lr_tiles = np.stack([lr_latents[b, y:y + tile, x:x + tile] for b, y, x in part])
            index = np.asarray([b for b, _, _ in part], np.int32)
            z_tiles, lr_tiles, index = jax.device_put((z_tiles, lr_tiles, index), sharding)
            pending.append(functions.velocity(transformer_params, z_tiles, lr_tiles, cond, index, t, r))
        blended, seen = np.zeros_like(z), set()
        for start, stop, tiles in zip(starts[:-1], starts[1:], pending):
            for (b, y, x), u in zip(rows[start:stop], np.asarray(tiles, np.float32)):
                if (b, y, x) not in seen:  # the repeats that fill the last device's share blend once
                    seen.add((b, y, x))
                    blended[b, y:y + tile, x:x + tile] += u * weights[:, :, None]
        blended[:, height:], blended[:, :, width:] = 0.0, 0.0
        z = extend(z + (r - t) * (blended / normaliser[None, :, :, None]), height, width, LATENT_PADDING)
    latents = jax.device_put(z, sharding)
    return np.asarray(functions.decode(autoencoder_params, latents, lr_canvas, size_array))
