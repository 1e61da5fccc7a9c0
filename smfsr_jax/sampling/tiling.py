"""Latent tiling with Gaussian blending (docs/design.md#latent-tiling; SMFSR/DiT4SR pipelines' tiled branch).

- A latent is tiled when h·w > T² (T = 64, overlap 24 upstream), and also when h or w is not a multiple
  of the MM-DiT patch size: the network needs whole patches, and upstream's VAE-only multiple of 8 can
  leave an odd latent side (upstream then fails; we tile with patch-multiple tiles instead), and when a side
  exceeds the positional-embedding grid (`max_side`; e.g. a 16x200 latent has h·w < 64² but no position past 192).
- Tile side T' = min(T, h, w), floored to a multiple of the patch size. Origins along an axis of size n:
  i·(T' − O) for i = 0, 1, … while the previous tile ends before n, the last one n − T'. If O ≥ T' (tiny
  latents with a large overlap, where upstream would loop forever) the overlap becomes T' // 2.
- Tile weight: the outer product of exp(−(y − T'/2)²/(2·0.01·T'²)) (rows; upstream's midpoint T'/2) and
  exp(−(x − (T'−1)/2)²/(2·0.01·T'²)) (columns), divided per pixel by the summed weights.
- The tiled function blends the *velocity*; the sampler then takes its step on the full latent. Tiles of all
  images are run through the network in chunks of `tile_batch` (a `lax.map` over padded chunks, so one
  network compilation), not one by one.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

TILE_SIZE, TILE_OVERLAP = 64, 24
TILE_BATCH = 16
_GAUSSIAN_VAR = 0.01


def needs_tiling(height: int, width: int, tile_size: int, patch_size: int, max_side: int | None = None) -> bool:
    return (height * width > tile_size * tile_size or height % patch_size != 0 or width % patch_size != 0
            or (max_side is not None and max(height, width) > max_side))


def tile_origins(size: int, tile: int, overlap: int) -> tuple[int, ...]:
    """Upstream's origins on an axis: i·(tile − overlap) until a tile reaches `size`; the last is size − tile."""
    if not 0 <= overlap < tile <= size:
        raise ValueError(f"need 0 <= overlap < tile <= size, got overlap={overlap}, tile={tile}, size={size}")
    count = 1
    while (count - 1) * (tile - overlap) + tile < size:
        count += 1
    return tuple(i * (tile - overlap) for i in range(count - 1)) + (size - tile,)


def tile_weights(tile: int) -> np.ndarray:
    """(tile, tile) float32 Gaussian blending weight; rows use midpoint tile/2, columns (tile − 1)/2 (upstream)."""
    def gaussian(midpoint):
        x = np.arange(tile, dtype=np.float64)
        density = np.exp(-((x - midpoint) ** 2) / (tile * tile) / (2 * _GAUSSIAN_VAR))
        return density / math.sqrt(2 * math.pi * _GAUSSIAN_VAR)
    return np.outer(gaussian(tile / 2), gaussian((tile - 1) / 2)).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class TileLayout:
    """Where the tiles of an (height, width) latent lie and how they blend."""
    height: int
    width: int
    tile: int
    origins_y: tuple[int, ...]
    origins_x: tuple[int, ...]

    @property
    def boxes(self) -> list[tuple[int, int]]:
        """(y, x) tile origins in upstream order: columns outer, rows inner (the blend sums in this order)."""
        return [(y, x) for x in self.origins_x for y in self.origins_y]

    @property
    def weights(self) -> np.ndarray:
        return tile_weights(self.tile)

    def weight_sum(self) -> np.ndarray:
        """(height, width) summed tile weights: the per-pixel normaliser."""
        total = np.zeros((self.height, self.width), np.float32)
        weights = self.weights
        for y, x in self.boxes:
            total[y:y + self.tile, x:x + self.tile] += weights
        return total


def tile_layout(height: int, width: int, tile_size: int = TILE_SIZE, overlap: int = TILE_OVERLAP,
                patch_size: int = 2) -> TileLayout:
    tile = min(tile_size, height, width) // patch_size * patch_size
    if tile < patch_size:
        raise ValueError(f"latent {height}x{width} is smaller than one patch of {patch_size}")
    if overlap >= tile:
        overlap = tile // 2
    return TileLayout(height, width, tile, tile_origins(height, tile, overlap), tile_origins(width, tile, overlap))


def map_in_chunks(fn, chunk: int, *arrays):
    """fn over the leading axis of `arrays` in equal chunks of at most `chunk` rows (one compiled chunk shape),
    padded by fewer rows than there are chunks: 36 tiles at 16 run as 3 x 12, not 3 x 16 with 12 of padding."""
    rows = arrays[0].shape[0]
    count = -(-rows // max(1, min(chunk, rows)))
    chunk = -(-rows // count)
    padded = [jnp.pad(a, [(0, count * chunk - rows)] + [(0, 0)] * (a.ndim - 1)) for a in arrays]
    chunked = [a.reshape((count, chunk) + a.shape[1:]) for a in padded]
    out = jax.lax.map(lambda xs: fn(*xs), tuple(chunked))
    return out.reshape((count * chunk,) + out.shape[2:])[:rows]


def tile_bytes(config, tile: int, text_tokens: int) -> int:
    """An estimate of one latent tile's temporaries in a network call: per head three fp32 (S x S) attention
    matrices (logits, exponentials, weights) over the joint sequence of S = 2 x (tile / patch)² image and LR tokens
    plus the text, and eight fp32 activations of the hidden width per token. XLA:CPU's compiled temporaries: SD3.5-M
    (24 blocks, fp32, one 64² tile) 1.00 of it; narrow two-block MM-DiTs (4 and 8 heads, 16² and 32² tiles, 1 to 4
    tiles a call) 0.75 to 0.83 (tests/test_sampling.py); a two-block MM-DiT at SD3.5-M's width 1.44, an XLA buffer
    assignment that no real model has."""
    tokens = 2 * (tile // config.patch_size) ** 2 + text_tokens
    return config.num_heads * tokens * tokens * 4 * 3 + 8 * tokens * config.num_heads * config.head_dim * 4


def tile_batch_for_budget(config, tile: int, text_tokens: int, guided: bool, budget: int) -> int:
    """Latent tiles per network call that fit a memory budget (bytes): at least one, and two rows a tile under
    CFG (the unconditional and the conditional branch run as one batch)."""
    return max(1, budget // (tile_bytes(config, tile, text_tokens) * (2 if guided else 1)))


def tiled_velocity(velocity_fn, tile_size: int = TILE_SIZE, overlap: int = TILE_OVERLAP,
                   tile_batch: int = TILE_BATCH, patch_size: int = 2, max_side: int | None = None):
    """Wrap a velocity function (samplers.py signature): tiles when `needs_tiling`, else calls it directly.
    max_side: the longest latent side the network's positional grid takes (patch size x pos_embed_max_size)."""
    def velocity(z, lr_latents, cond, t, r):
        batch, height, width, channels = z.shape
        if not needs_tiling(height, width, tile_size, patch_size, max_side):
            return velocity_fn(z, lr_latents, cond, t, r)
        layout = tile_layout(height, width, tile_size, overlap, patch_size)
        tile, boxes = layout.tile, layout.boxes

        def crops(latents):  # (tiles * batch, tile, tile, C), tile-major
            return jnp.concatenate([latents[:, y:y + tile, x:x + tile] for y, x in boxes])

        # Each tile row gathers its image's conditioning inside the chunk, so cond is never repeated per tile.
        image_index = jnp.tile(jnp.arange(batch), len(boxes))

        def run(z_tiles, lr_tiles, index):
            tile_cond = jax.tree.map(lambda a: jnp.take(a, index, axis=0), cond)
            return velocity_fn(z_tiles, lr_tiles, tile_cond, t, r)

        u_tiles = map_in_chunks(run, tile_batch, crops(z), crops(lr_latents), image_index)
        u_tiles = u_tiles.reshape(len(boxes), batch, tile, tile, channels)
        weights = jnp.asarray(layout.weights)[None, :, :, None]
        blended = jnp.zeros(z.shape, u_tiles.dtype)
        for k, (y, x) in enumerate(boxes):
            blended = blended.at[:, y:y + tile, x:x + tile].add(u_tiles[k] * weights)
        return blended / jnp.asarray(layout.weight_sum())[None, :, :, None]

    return velocity
