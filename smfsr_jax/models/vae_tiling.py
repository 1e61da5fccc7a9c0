"""Tiled AutoencoderKL encode/decode: whole-image GroupNorm statistics, memory flat in the image size.

The SD3 VAE run whole on a 4096² image needs tens of GB of activations and attends over 262,144 latent tokens in
its mid block. Here the image is cut into a grid of equal-shaped tiles that run one at a time in a loop inside
the jitted function, so the compiled temporaries are those of one tile (plus the input and output images).

- **Halo.** Each tile reads its core plus a margin wide enough that every convolution, down- and upsampling at
  the core equals the whole-image one (116 pixels for the SD3 encoder, 18 latent pixels for the decoder). The
  margin is cropped level by level to what the remaining layers still need, so the full-resolution layers
  of the decoder carry only 8 extra pixels. Positions outside the image are zeroed before every convolution
  (and left out of the attention), which reproduces the whole image's zero padding at its borders. Cores
  partition the image and are pasted; with exact convolutions and statistics there is nothing to blend.
- **GroupNorm statistics of the whole image.** Every GroupNorm reads its per-group mean and variance from a
  table and records (count, sum, sum of squares) in fp32 over its tile's core inside the image, so no position
  counts twice; summed over tiles they give the whole-image mean and var = E[x²] - E[x]² (exact, unlike a mean
  of per-tile variances). The k-th GroupNorm's input depends on the statistics of all the ones before it, so
  pass k over all tiles fills entry k from entries 0..k-1 and skips every layer after the k-th GroupNorm
  (`lax.cond`): it costs the network up to that GroupNorm. One pass per GroupNorm (22 in the SD3 encoder, 30
  in the decoder), then the output pass; all are steps of one `lax.fori_loop` around one traced copy of the
  network, so compilation does not grow with the passes or the image. Iterating the whole table to its fixed
  point instead (every pass the full network, from per-tile statistics) reaches float rounding only after
  about as many passes as there are GroupNorms (measured: the Jacobian of the table is triangular and does not
  contract), at the cost of full passes.
- **Attention.** The mid-block self-attention runs per tile over the tile's extent at that layer (its core
  plus the margin the later layers need): an approximation of the whole-latent attention, exact when that
  extent covers the latent.

Running the network layer by layer over all tiles (the task-list form of OSEDiff's tiled VAE hook: exact
statistics in one pass) keeps whole-image activations between layers; the passes here trade compute for memory
that does not grow: about 15x an untiled encode and 12x an untiled decode in convolution FLOPs (the sum over
GroupNorms of the network's cost up to each), plus the halo.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from smfsr_jax.models import vae
from smfsr_jax.models.attention import dot_product_attention

DEFAULT_TILE = 512  # pixels of the image side the encoder reads and the decoder writes per tile


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def encoder_margins(config: vae.VAEConfig) -> tuple[int, list[int], int]:
    """(margin read around each core in pixels, margin at the first resnet of each level, margin before the
    mid-block attention) that keep the encoder's output at the core exact.

    Backwards from conv_out: a 3x3 conv needs one more position, the stride-2 downsample (reading 2i..2i+2)
    2r + 2 for r after it; margins stay even so that tiles fall on the downsample grid.
    """
    levels, convs = len(config.block_out_channels), 2 * config.layers_per_block
    attention = 2 + 1  # the mid block's second resnet, conv_out
    margins = [convs + 2 + attention]  # the last level's resnets, the mid block's first resnet
    for _ in range(levels - 1):
        margins.insert(0, 2 * margins[0] + 2 + convs)
    return _round_up(margins[0] + 1, 2), margins, attention


def decoder_margins(config: vae.VAEConfig) -> tuple[int, list[int], list[int], int]:
    """(margin read around each core in latent pixels, margin at the first resnet of each level, margin before
    each nearest upsample, margin before the mid-block attention) that keep the decoder's output core exact."""
    levels, convs = len(config.block_out_channels), 2 * (config.layers_per_block + 1)
    margins, upsample = [convs + 1], []  # the last level's resnets, conv_out
    for _ in range(levels - 1):
        upsample.insert(0, -(-(margins[0] + 1) // 2))  # the upsampler's conv, then nearest x2
        margins.insert(0, upsample[0] + convs)
    attention = margins[0] + 2  # the mid block's second resnet
    return attention + 2 + 1, margins, upsample, attention


def _finalize(moments):
    """(..., 3) fp32 (count, sum, sum of squares) -> mean, biased variance."""
    count = jnp.maximum(moments[..., 0], 1.0)
    mean = moments[..., 1] / count
    return mean, jnp.maximum(moments[..., 2] / count - mean * mean, 0.0)


class _Tile:
    """One tile's forward in one pass while it is traced: where its extent lies at the current resolution, the
    GroupNorm statistics it reads (`table`) and the moments it records.

    Pass p fills the p-th GroupNorm (in call order), whose input depends only on the ones before it: every
    layer after that GroupNorm is skipped (a `lax.cond`), so pass p costs the network up to its GroupNorm.
    """

    def __init__(self, params, config, origin, size, core, margin, table, pass_index):
        self.params, self.config, self.dtype = params, config, jnp.dtype(config.dtype)
        self.origin = origin  # traced (y, x): the core's first position
        self.size, self.core, self.margin = size, core, margin  # static (h, w), (h, w), int
        self.table, self.pass_index = table, pass_index
        self.norms = 0  # GroupNorms traced so far
        self.moments = {}

    def _when_needed(self, fn, *args):
        """fn(*args) in the passes that need it (those after the GroupNorms before it), else zeros."""
        if not self.norms:
            return fn(*args)
        shapes = jax.eval_shape(fn, *args)
        # Zeros like the input, so that they carry its sharding type (varying inside shard_map).
        skip = lambda *a: jax.tree.map(lambda s: jax.lax.full_like(a[0], 0, s.dtype, s.shape), shapes)  # noqa: E731
        return jax.lax.cond(self.norms <= self.pass_index, fn, skip, *args)

    def _module(self, path: str) -> dict:
        params = self.params
        for name in path.split("/"):
            params = params[name]
        return params

    def _positions(self, x):
        """Global rows and columns of the extent at x's resolution."""
        rows = self.origin[0] - self.margin + jnp.arange(x.shape[1])
        cols = self.origin[1] - self.margin + jnp.arange(x.shape[2])
        return rows, cols

    def in_image(self, x):
        rows, cols = self._positions(x)
        inside = ((rows >= 0) & (rows < self.size[0]))[:, None] & ((cols >= 0) & (cols < self.size[1]))[None, :]
        return inside[None, :, :, None]

    def in_core(self, x):
        rows, cols = jnp.arange(x.shape[1]), jnp.arange(x.shape[2])
        core = (((rows >= self.margin) & (rows < self.margin + self.core[0]))[:, None]
                & ((cols >= self.margin) & (cols < self.margin + self.core[1]))[None, :])
        return self.in_image(x) & core[None, :, :, None]

    def crop(self, x, margin: int):
        cut = self.margin - margin
        if cut < 0:
            raise ValueError(f"tile margin {self.margin} is narrower than the {margin} needed")
        self.margin = margin
        return x[:, cut:x.shape[1] - cut, cut:x.shape[2] - cut, :] if cut else x

    def conv(self, path: str, x, stride: int = 1, padding=1):
        params = self._module(path)
        kernel = params["kernel"].shape[0]
        layer = vae._conv(params["kernel"].shape[-1], self.dtype, "conv", kernel=kernel, stride=stride,
                          padding=padding if kernel > 1 else 0)
        if kernel > 1:  # what lies outside the image is the whole image's zero padding
            x = jnp.where(self.in_image(x), x, jnp.zeros((), x.dtype))
        return self._when_needed(lambda x: layer.apply({"params": params}, x), x)

    def norm(self, path: str, x):
        """GroupNorm of x with the table's statistics; records this core's (count, sum, sum of squares)."""
        batch, height, width, channels = x.shape
        groups, size = self.config.norm_num_groups, channels // self.config.norm_num_groups
        params, (mean, var) = self._module(path), self.table[path]
        core = self.in_core(x)[..., None]

        def run(x):
            grouped = jnp.where(core, x.astype(jnp.float32).reshape(batch, height, width, groups, size), 0.0)
            count = jnp.broadcast_to(jnp.sum(core, dtype=jnp.float32) * size, (batch, groups))
            moments = jnp.stack([count, grouped.sum((1, 2, 4)), jnp.square(grouped).sum((1, 2, 4))], -1)
            # flax's GroupNorm arithmetic: fp32 normalisation and affine, then the compute dtype.
            shift = jnp.repeat(mean, size, axis=-1)[:, None, None, :]
            scale = jax.lax.rsqrt(jnp.repeat(var, size, axis=-1) + vae.GROUP_NORM_EPS) * params["scale"]
            return ((x - shift) * scale[:, None, None, :] + params["bias"]).astype(self.dtype), moments

        y, self.moments[path] = self._when_needed(run, x)
        self.norms += 1
        return y

    def resnet(self, path: str, x):
        h = self.conv(f"{path}/conv1", nn.silu(self.norm(f"{path}/norm1", x)))
        h = self.conv(f"{path}/conv2", nn.silu(self.norm(f"{path}/norm2", h)))
        if "conv_shortcut" in self._module(path):
            x = self.conv(f"{path}/conv_shortcut", x)
        return x + h

    def attention(self, path: str, x):
        """vae.SpatialSelfAttention over the extent's positions inside the image."""
        batch, height, width, channels = x.shape
        h = self.norm(f"{path}/group_norm", x).reshape(batch, height * width, 1, channels)

        def dense(name, inputs):
            layer = nn.Dense(channels, dtype=self.dtype, param_dtype=jnp.float32)
            return layer.apply({"params": self._module(f"{path}/{name}")}, inputs)

        keys = self.in_image(x).reshape(1, 1, 1, height * width)

        def run(h):
            h = dot_product_attention(dense("to_q", h), dense("to_k", h), dense("to_v", h),
                                      scale=1.0 / math.sqrt(channels), mask=keys)
            return dense("to_out", h.reshape(batch, height * width, channels))

        return x + self._when_needed(run, h).reshape(batch, height, width, channels)

    def downsample(self, path: str, x):
        """vae.Downsample on an extent that starts on the stride-2 grid."""
        x = self.conv(path, x, stride=2, padding=((0, 1), (0, 1)))
        self.origin = (self.origin[0] // 2, self.origin[1] // 2)
        self.size = (self.size[0] // 2, self.size[1] // 2)
        self.core, self.margin = (self.core[0] // 2, self.core[1] // 2), self.margin // 2
        return x

    def upsample(self, path: str, x):
        """vae.Upsample: nearest x2, then a 3x3 conv."""
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        self.origin = (self.origin[0] * 2, self.origin[1] * 2)
        self.size = (self.size[0] * 2, self.size[1] * 2)
        self.core, self.margin = (self.core[0] * 2, self.core[1] * 2), self.margin * 2
        return self.conv(path, x)


def _encoder(tile: _Tile, x):
    """vae.Encoder on one tile: images -> (mean, logvar) moments at the core."""
    cfg = tile.config
    levels = len(cfg.block_out_channels)
    _, margins, attention = encoder_margins(cfg)
    x = tile.conv("conv_in", x)
    for level in range(levels):
        x = tile.crop(x, margins[level])
        for j in range(cfg.layers_per_block):
            x = tile.resnet(f"down_blocks_{level}/resnets_{j}", x)
        if level < levels - 1:
            x = tile.downsample(f"down_blocks_{level}/downsamplers_0/conv", x)
    x = tile.resnet("mid_block/resnets_0", x)
    x = tile.attention("mid_block/attentions_0", tile.crop(x, attention))
    x = tile.resnet("mid_block/resnets_1", x)
    x = tile.conv("conv_out", nn.silu(tile.norm("conv_norm_out", tile.crop(x, 1))))
    return tile.crop(x, 0)


def _decoder(tile: _Tile, z):
    """vae.Decoder on one tile: latents -> images at the core."""
    cfg = tile.config
    levels = len(cfg.block_out_channels)
    _, margins, upsample, attention = decoder_margins(cfg)
    x = tile.conv("conv_in", z)
    x = tile.resnet("mid_block/resnets_0", x)
    x = tile.attention("mid_block/attentions_0", tile.crop(x, attention))
    x = tile.resnet("mid_block/resnets_1", x)
    for level in range(levels):
        x = tile.crop(x, margins[level])
        for j in range(cfg.layers_per_block + 1):
            x = tile.resnet(f"up_blocks_{level}/resnets_{j}", x)
        if level < levels - 1:
            x = tile.upsample(f"up_blocks_{level}/upsamplers_0/conv", tile.crop(x, upsample[level]))
    x = tile.conv("conv_out", nn.silu(tile.norm("conv_norm_out", tile.crop(x, 1))))
    return tile.crop(x, 0)


def _check(config: vae.VAEConfig, tile: int):
    if tile < 0 or tile % config.downscale:
        raise ValueError(f"VAE tile must be 0 (off) or a positive multiple of the downscale {config.downscale} "
                         f"pixels, got {tile}")


def needs_tiling(height: int, width: int, tile: int) -> bool:
    """Whether an image of this size (pixels) runs in tiles: tiling is on and the image exceeds the tile."""
    return tile > 0 and (height > tile or width > tile)


def tile_grid(height: int, width: int, tile: int, multiple: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """((core height, core width), (rows, columns)) of the tiles over a (height, width) input: ceil(side / tile)
    per side, equal cores as small as that count allows (rounded up to `multiple`), so that less of the last row
    and column lies outside the input."""
    cores = tuple(_round_up(-(-size // -(-size // tile)), multiple) for size in (height, width))
    return cores, tuple(-(-size // core) for size, core in zip((height, width), cores))


def border_jumps(x, cores: tuple[int, int]) -> tuple[float, float]:
    """(largest |difference| of neighbours across tile borders, largest inside tiles) of (B, H, W, C) x tiled
    with cores (rows, columns) from the origin: a seam shows as the first exceeding the second."""
    across, inside = [], []
    for axis, core in ((1, cores[0]), (2, cores[1])):
        jumps = jnp.abs(jnp.diff(jnp.asarray(x, jnp.float32), axis=axis)).max(axis=(0, 3, 3 - axis))
        border = (jnp.arange(jumps.shape[0]) + 1) % core == 0
        across.append(jnp.max(jnp.where(border, jumps, 0.0)))
        inside.append(jnp.max(jnp.where(border, 0.0, jumps)))
    return float(max(across)), float(max(inside))


def _run(params, config: vae.VAEConfig, x, tile: int, part: str):
    """The tiled encoder or decoder ('encoder' | 'decoder'): (output, {GroupNorm path: (mean, var)}). x is images
    for the encoder, latents for the decoder; `tile` is in image pixels either way."""
    f = config.downscale
    batch, height, width, channels = x.shape
    if part == "encoder":
        unit, align, read, forward = tile, f, encoder_margins(config)[0], _encoder
        out_channels, out_size = 2 * config.latent_channels, (height // f, width // f)
    else:
        unit, align, read, forward = tile // f, 1, decoder_margins(config)[0], _decoder
        out_channels, out_size = config.out_channels, (height * f, width * f)
    cores, counts = tile_grid(height, width, unit, align)
    out_cores = tuple(c // f if part == "encoder" else c * f for c in cores)
    tiles = counts[0] * counts[1]
    params = params[part]
    padded = jnp.pad(x.astype(jnp.dtype(config.dtype)),
                     ((0, 0), (read, read + counts[0] * cores[0] - height),
                      (read, read + counts[1] * cores[1] - width), (0, 0)))
    paths = sorted({"/".join(key[:-1]) for key in traverse_util.flatten_dict(params) if key[-1] == "scale"})
    groups = (batch, config.norm_num_groups)
    # Filled like the input, so that the loop carry has its sharding type (varying inside shard_map).
    fill = lambda value, shape: jax.lax.full_like(padded, value, jnp.float32, shape)  # noqa: E731
    table = {p: (fill(0, groups), fill(1, groups)) for p in paths}
    sums = {p: fill(0, (*groups, 3)) for p in paths}
    out = fill(0, (batch, counts[0] * out_cores[0], counts[1] * out_cores[1], out_channels))

    def step(i, carry):
        table, sums, out = carry
        pass_index, index = i // tiles, i % tiles
        row, col = index // counts[1], index % counts[1]
        origin = (row * cores[0], col * cores[1])
        extent = jax.lax.dynamic_slice(padded, (0, *origin, 0),
                                       (batch, cores[0] + 2 * read, cores[1] + 2 * read, channels))
        state = _Tile(params, config, origin, (height, width), cores, read, table, pass_index)
        y = forward(state, extent).astype(jnp.float32)
        out = jax.lax.dynamic_update_slice(out, y, (0, row * out_cores[0], col * out_cores[1], 0))
        sums = {p: sums[p] + state.moments[p] for p in paths}
        # At the end of a statistics pass the sums become the table (the entries of GroupNorms the pass skipped
        # are rewritten before any pass reads them); the output pass keeps the table it read.
        refresh = (index == tiles - 1) & (pass_index < len(paths))
        table = {p: jax.tree.map(lambda new, old: jnp.where(refresh, new, old), _finalize(sums[p]), table[p])
                 for p in paths}
        sums = {p: jnp.where(index == tiles - 1, 0.0, sums[p]) for p in paths}
        return table, sums, out

    table, _, out = jax.lax.fori_loop(0, (len(paths) + 1) * tiles, step, (table, sums, out))
    return out[:, :out_size[0], :out_size[1], :], table


def encode(params, config: vae.VAEConfig, images, tile: int = DEFAULT_TILE):
    """`AutoencoderKL.encode` of (B, H, W, C) images in [-1, 1] -> (mean, logvar), in tiles of `tile` pixels when
    the image exceeds them (0: whole). A pixel autoencoder always runs whole (it is pointwise in blocks)."""
    if config.kind != "kl":
        return vae.make_autoencoder(config).apply({"params": params}, images, method="encode")
    _check(config, tile)
    if not needs_tiling(images.shape[1], images.shape[2], tile):
        return vae.AutoencoderKL(config).apply({"params": params}, images, method="encode")
    moments, _ = _run(params, config, images, tile, "encoder")
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, *vae.LOGVAR_RANGE)


def decode(params, config: vae.VAEConfig, latents, tile: int = DEFAULT_TILE):
    """`AutoencoderKL.decode` of raw (B, h, w, latent_channels) latents -> (B, h*f, w*f, C) images, in tiles of
    `tile` output pixels when the image exceeds them (0: whole)."""
    if config.kind != "kl":
        return vae.make_autoencoder(config).apply({"params": params}, latents, method="decode")
    _check(config, tile)
    f = config.downscale
    if not needs_tiling(latents.shape[1] * f, latents.shape[2] * f, tile):
        return vae.AutoencoderKL(config).apply({"params": params}, latents, method="decode")
    return _run(params, config, latents, tile, "decoder")[0]


def group_norm_statistics(params, config: vae.VAEConfig, inputs, part: str, tile: int = DEFAULT_TILE) -> dict:
    """{GroupNorm path in the part ('encoder' | 'decoder'): (mean, var), each (B, groups) fp32} that the tiled
    output is normalised with (inputs: images for the encoder, latents for the decoder; tile > 0)."""
    if part not in ("encoder", "decoder"):
        raise ValueError(f"part must be 'encoder' or 'decoder', got {part!r}")
    _check(config, tile)
    if tile == 0:
        raise ValueError("group_norm_statistics needs a tile > 0")
    return _run(params, config, inputs, tile, part)[1]
