"""Tiled AutoencoderKL encode/decode: exact (whole-image GroupNorm statistics and attention), memory nearly flat.

The SD3 VAE run whole on a 4096² image needs tens of GB of activations and attends over 262,144 latent tokens in
its mid block. Here the image is cut into a grid of equal-shaped tiles that run one at a time in a loop inside
the jitted function, so the compiled temporaries are those of one tile, plus the input and output images and the
attention's whole-latent buffers. The output equals the untiled one up to float rounding, so pasting is
seamless by construction.

- **Halo.** Each tile reads its core plus a margin wide enough that every convolution, down- and upsampling at
  the core equals the whole-image one up to the attention, which needs only the core (92 pixels for the SD3
  encoder, 3 latent pixels for the decoder); the layers after the attention read their extent (core plus 3 and
  15 latent pixels) from the attention's buffer. The margin is cropped level by level to what the remaining
  layers still need, so the full-resolution layers of the decoder carry only 8 extra pixels. Positions outside
  the image are zeroed before every convolution (and left out of the attention's keys), which reproduces the
  whole image's zero padding at its borders. Cores partition the image and are pasted; nothing is blended.
- **GroupNorm statistics of the whole image.** Every GroupNorm reads its per-group mean and variance from a
  table and records (count, sum, sum of squares) in fp32 over its tile's core inside the image, so no position
  counts twice; summed over tiles they give the whole-image mean and var = E[x²] - E[x]² (exact, unlike a mean
  of per-tile variances). The k-th GroupNorm's input depends on the statistics of all the ones before it, so a
  pass over all tiles fills one entry from the ones before and skips every later layer (`lax.cond`).
- **Attention over the whole latent.** The mid block runs at latent resolution, so its whole input is small
  next to full-resolution activations. Once its GroupNorm is filled, the keys pass pastes each tile's core of
  the normalised input and of the input into two whole-latent buffers; the attention pass computes each core's
  queries against the keys and values of all positions, projected chunk by chunk from the buffer (KEY_CHUNK keys
  a step of a `lax.scan`: online softmax with running max and sum, fp32 accumulation, O(core queries x chunk)
  memory, never O(N²)), and adds the result to the residual buffer in place; the passes after it read their
  extent from that buffer and skip every layer before the attention.
- **Passes.** One per GroupNorm (22 in the SD3 encoder, 30 in the decoder), the keys and the attention pass,
  then the output pass: all are steps of one `lax.fori_loop` around one traced copy of the network, so
  compilation does not grow with the passes or the image. Iterating the whole table to its fixed point instead
  (every pass the full network, from per-tile statistics) reaches float rounding only after about as many
  passes as there are GroupNorms (measured: the Jacobian of the table is triangular and does not contract).

Cost: a pass runs the network up to its GroupNorm (the layers after the attention, from the buffer), about 12x
an untiled encode and 11.5x an untiled decode in convolution FLOPs, plus the halo; the attention once, as the
untiled one plus the key and value projections recomputed per tile (channels / (2 x core queries), 6 % for SD3
at 512-pixel tiles). Memory: the tile's temporaries do not grow with the image; the two buffers (latent side² x
512 channels each, in the compute dtype) do, at 1/64 of the image's pixels: about 2 x 256 MiB in bf16 (2 x 512
MiB in fp32) for a 4096² image, 512² latents (the residual one a little more: padded by its margin).
Running the network layer by layer over all tiles (the task-list form of OSEDiff's
tiled VAE hook: exact statistics in one pass) would instead keep whole-image activations between layers.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from smfsr_jax.models import vae

TILE_STEP = 64  # tile sides chosen by tile_for_budget are multiples of it (and so of every VAE's downscale)
KEY_CHUNK = 2048  # keys per step of the mid-block attention's online softmax (whole buffer rows, at least one)


def _chunk_rows(rows: int, columns: int) -> int:
    """Rows of keys per attention chunk: KEY_CHUNK keys in whole rows (at least one), never more rows than there
    are, so that a small latent is not padded to a whole chunk."""
    return min(max(1, KEY_CHUNK // columns), rows)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def encoder_margins(config: vae.VAEConfig) -> tuple[int, list[int], int]:
    """(margin read around each core in pixels, margin at the first resnet of each level, margin of the extent
    that the layers after the mid-block attention read from the attention's buffer) that keep the encoder's
    output at the core exact.

    Backwards from the attention, which needs only the core (its keys come from the whole-latent buffer): a 3x3
    conv needs one more position, the stride-2 downsample (reading 2i..2i+2) 2r + 2 for r after it; margins stay
    even so that tiles fall on the downsample grid.
    """
    levels, convs = len(config.block_out_channels), 2 * config.layers_per_block
    margins = [convs + 2]  # the last level's resnets, the mid block's first resnet
    for _ in range(levels - 1):
        margins.insert(0, 2 * margins[0] + 2 + convs)
    return _round_up(margins[0] + 1, 2), margins, 2 + 1  # after the attention: the second resnet, conv_out


def decoder_margins(config: vae.VAEConfig) -> tuple[int, list[int], list[int], int]:
    """(margin read around each core in latent pixels, margin at the first resnet of each level, margin before
    each nearest upsample, margin of the extent read from the attention's buffer) that keep the decoder's output
    core exact."""
    levels, convs = len(config.block_out_channels), 2 * (config.layers_per_block + 1)
    margins, upsample = [convs + 1], []  # the last level's resnets, conv_out
    for _ in range(levels - 1):
        upsample.insert(0, -(-(margins[0] + 1) // 2))  # the upsampler's conv, then nearest x2
        margins.insert(0, upsample[0] + convs)
    return 1 + 2, margins, upsample, margins[0] + 2  # conv_in, the first resnet; after: the second resnet


def norms_through_attention(config: vae.VAEConfig, part: str) -> int:
    """How many GroupNorms the part ('encoder' | 'decoder') calls up to and including the mid-block attention's:
    the pass that writes the attention's buffers."""
    resnets = len(config.block_out_channels) * config.layers_per_block if part == "encoder" else 0
    return 2 * (resnets + 1) + 1  # two per resnet, the mid block's first resnet, the attention's GroupNorm


def _finalize(moments):
    """(..., 3) fp32 (count, sum, sum of squares) -> mean, biased variance."""
    count = jnp.maximum(moments[..., 0], 1.0)
    mean = moments[..., 1] / count
    return mean, jnp.maximum(moments[..., 2] / count - mean * mean, 0.0)


def _paste(buffer, value, start, write):
    """buffer with value at start where `write` (traced), else unchanged: a select on the slice, so that the
    update stays in place in the loop carry."""
    old = jax.lax.dynamic_slice(buffer, start, value.shape)
    return jax.lax.dynamic_update_slice(buffer, jnp.where(write, value.astype(buffer.dtype), old), start)


class _Tile:
    """One tile's forward in one pass while it is traced: where its extent lies at the current resolution, the
    GroupNorm statistics it reads (`table`), the moments it records and the attention's whole-latent buffers.

    Stages are the steps between GroupNorms and the attention's two buffer writes, in call order; pass p runs
    the layers of stages <= p, except that the passes after the attention pass read its output from the buffer
    instead of running the layers before it (each skipped layer is a `lax.cond`).
    """

    def __init__(self, params, config, origin, size, core, margin, table, buffers, after, pass_index, keys_pass):
        self.params, self.config, self.dtype = params, config, jnp.dtype(config.dtype)
        self.origin = origin  # traced (y, x): the core's first position
        self.size, self.core, self.margin = size, core, margin  # static (h, w), (h, w), int
        self.table, self.pass_index, self.keys_pass = table, pass_index, keys_pass
        self.normed, self.residual = buffers  # the attention's normalised input, its input and then output
        self.after = after  # the margin of the extent read from the residual buffer
        self.stage = 0
        self.stages, self.moments = {}, {}  # GroupNorm path -> its stage (the pass that fills it), its moments

    def _live(self):
        """Whether the layers of the current stage run in this pass."""
        live = self.stage <= self.pass_index
        return live & (self.pass_index <= self.keys_pass) if self.stage < self.keys_pass else live

    def _when(self, live, fn, *args):
        """fn(*args) where `live` (traced), else zeros of its shapes."""
        shapes = jax.eval_shape(fn, *args)
        # Zeros like the input, so that they carry its sharding type (varying inside shard_map).
        skip = lambda *a: jax.tree.map(lambda s: jax.lax.full_like(a[0], 0, s.dtype, s.shape), shapes)  # noqa: E731
        return jax.lax.cond(live, fn, skip, *args)

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

    def dense(self, path: str, x):
        layer = nn.Dense(x.shape[-1], dtype=self.dtype, param_dtype=jnp.float32)
        return layer.apply({"params": self._module(path)}, x)

    def conv(self, path: str, x, stride: int = 1, padding=1):
        params = self._module(path)
        kernel = params["kernel"].shape[0]
        layer = vae._conv(params["kernel"].shape[-1], self.dtype, "conv", kernel=kernel, stride=stride,
                          padding=padding if kernel > 1 else 0)
        if kernel > 1:  # what lies outside the image is the whole image's zero padding
            x = jnp.where(self.in_image(x), x, jnp.zeros((), x.dtype))
        return self._when(self._live(), lambda x: layer.apply({"params": params}, x), x)

    def norm(self, path: str, x):
        """GroupNorm of x with the table's statistics; records this core's (count, sum, sum of squares)."""
        batch, height, width, channels = x.shape
        groups, size = self.config.norm_num_groups, channels // self.config.norm_num_groups
        params = self._module(path)
        core = self.in_core(x)[..., None]

        def run(x):
            grouped = jnp.where(core, x.astype(jnp.float32).reshape(batch, height, width, groups, size), 0.0)
            count = jnp.broadcast_to(jnp.sum(core, dtype=jnp.float32) * size, (batch, groups))
            moments = jnp.stack([count, grouped.sum((1, 2, 4)), jnp.square(grouped).sum((1, 2, 4))], -1)
            mean, var = self.statistics(path, moments)
            # flax's GroupNorm arithmetic: fp32 normalisation and affine, then the compute dtype.
            shift = jnp.repeat(mean, size, axis=-1)[:, None, None, :]
            scale = jax.lax.rsqrt(jnp.repeat(var, size, axis=-1) + vae.GROUP_NORM_EPS) * params["scale"]
            return ((x - shift) * scale[:, None, None, :] + params["bias"]).astype(self.dtype), moments

        y, self.moments[path] = self._when(self._live(), run, x)
        self.stages[path] = self.stage
        self.stage += 1
        return y

    def statistics(self, path: str, moments):
        """The (mean, var) the GroupNorm at `path` normalises with: the table's, filled by earlier passes."""
        del moments
        return self.table[path]

    def resnet(self, path: str, x):
        h = self.conv(f"{path}/conv1", nn.silu(self.norm(f"{path}/norm1", x)))
        h = self.conv(f"{path}/conv2", nn.silu(self.norm(f"{path}/norm2", h)))
        if "conv_shortcut" in self._module(path):
            x = self.conv(f"{path}/conv_shortcut", x)
        return x + h

    def attention(self, path: str, x):
        """vae.SpatialSelfAttention over the whole latent, from x at the core (margin 0): the keys pass pastes
        the core's normalised input and input into the buffers, the attention pass adds the attention of the
        core's queries over all keys to the residual buffer in place, later passes read their extent (margin
        `after`) from it."""
        batch, height, width, channels = x.shape
        h = self.norm(f"{path}/group_norm", x)
        if self.stage != self.keys_pass or self.margin:
            raise ValueError(f"the attention runs at stage {self.stage} with margin {self.margin}, expected stage "
                             f"{self.keys_pass} with margin 0")
        at = (0, self.origin[0], self.origin[1], 0)  # the core in the normalised buffer; in the residual buffer,
        padded = (0, self.origin[0] + self.after, self.origin[1] + self.after, 0)  # padded by `after`
        self.normed = _paste(self.normed, h, at, self.pass_index == self.stage)
        self.residual = _paste(self.residual, x, padded, self.pass_index == self.stage)
        self.stage += 1

        def run(normed, x):
            q = self.dense(f"{path}/to_q", jax.lax.dynamic_slice(normed, at, x.shape).reshape(batch, -1, channels))
            out = _attend(q, normed, self.size, lambda name, h: self.dense(f"{path}/{name}", h),
                          1.0 / math.sqrt(channels))
            out = self.dense(f"{path}/to_out", out.astype(self.dtype))
            return x + out.reshape(x.shape)

        core = jax.lax.dynamic_slice(self.residual, padded, x.shape)
        attended = self._when(self.pass_index == self.stage, run, self.normed, core)
        self.residual = _paste(self.residual, attended, padded, self.pass_index == self.stage)
        self.stage += 1
        self.margin = self.after
        extent = (batch, height + 2 * self.after, width + 2 * self.after, channels)
        return jax.lax.dynamic_slice(self.residual, (0, self.origin[0], self.origin[1], 0), extent)

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


class _Whole(_Tile):
    """The whole input as one tile in one pass, on a canvas holding an image of traced `size` at its top left:
    every GroupNorm takes its statistics from its own input inside the image, the attention attends over the
    image's positions only, and positions outside it are zeroed before every convolution, so the output inside
    the image is the image's alone (up to float rounding) whatever lies around it."""

    def __init__(self, params, config, size, shape):
        super().__init__(params, config, (0, 0), size, shape, 0, None, (None, None), 0, 0, 0)

    def _live(self):
        return True

    def _when(self, live, fn, *args):
        return fn(*args)

    def statistics(self, path: str, moments):
        return _finalize(moments)

    def in_core(self, x):
        return self.in_image(x)

    def crop(self, x, margin: int):
        return x

    def attention(self, path: str, x):
        batch, height, width, channels = x.shape
        h = self.norm(f"{path}/group_norm", x)
        rows = _round_up(height, _chunk_rows(height, width))  # whole key chunks (see _attend)
        keys = jnp.pad(h, ((0, 0), (0, rows - height), (0, 0), (0, 0)))
        q = self.dense(f"{path}/to_q", h.reshape(batch, -1, channels))
        out = _attend(q, keys, self.size, lambda name, h: self.dense(f"{path}/{name}", h), 1.0 / math.sqrt(channels))
        self.stage += 2
        return x + self.dense(f"{path}/to_out", out.astype(self.dtype)).reshape(x.shape)


def _attend(q, normed, size, dense, scale):
    """Softmax attention of queries q (B, Q, C) over the keys and values that `dense` ('to_k', 'to_v') projects
    from the positions of normed (B, rows, columns, C) inside `size`, online over chunks of KEY_CHUNK keys (whole
    rows of the buffer; `_run` makes the rows a multiple): running max and sum, fp32 accumulation. Memory is
    O(Q x chunk); the result is (B, Q, C) fp32."""
    batch, rows, columns, channels = normed.shape
    chunk_rows = _chunk_rows(rows, columns)
    inside_columns = jnp.arange(columns) < size[1]

    def chunk(carry, start):
        best, total, acc = carry
        h = jax.lax.dynamic_slice_in_dim(normed, start, chunk_rows, axis=1).reshape(batch, -1, channels)
        k, v = dense("to_k", h), dense("to_v", h)
        inside = ((start + jnp.arange(chunk_rows) < size[0])[:, None] & inside_columns[None, :]).reshape(1, 1, -1)
        logits = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32) * scale
        logits = jnp.where(inside, logits, -jnp.inf)
        # The first chunk holds position (0, 0), so the running max is finite from then on.
        new = jnp.maximum(best, logits.max(-1))
        weights = jnp.where(inside, jnp.exp(logits - new[..., None]), 0.0)
        decay = jnp.exp(best - new)
        acc = acc * decay[..., None] + jnp.einsum("bqk,bkc->bqc", weights.astype(v.dtype), v,
                                                  preferred_element_type=jnp.float32)
        return (new, total * decay + weights.sum(-1), acc), None

    init = (jax.lax.full_like(q, -jnp.inf, jnp.float32, q.shape[:2]), jax.lax.full_like(q, 0, jnp.float32, q.shape[:2]),
            jax.lax.full_like(q, 0, jnp.float32))
    (_, total, acc), _ = jax.lax.scan(chunk, init, jnp.arange(0, rows, chunk_rows))
    return acc / total[..., None]


def _encoder(tile: _Tile, x):
    """vae.Encoder on one tile: images -> (mean, logvar) moments at the core."""
    cfg = tile.config
    levels = len(cfg.block_out_channels)
    _, margins, _ = encoder_margins(cfg)
    x = tile.conv("conv_in", x)
    for level in range(levels):
        x = tile.crop(x, margins[level])
        for j in range(cfg.layers_per_block):
            x = tile.resnet(f"down_blocks_{level}/resnets_{j}", x)
        if level < levels - 1:
            x = tile.downsample(f"down_blocks_{level}/downsamplers_0/conv", x)
    x = tile.resnet("mid_block/resnets_0", x)
    x = tile.attention("mid_block/attentions_0", tile.crop(x, 0))
    x = tile.resnet("mid_block/resnets_1", x)
    x = tile.conv("conv_out", nn.silu(tile.norm("conv_norm_out", tile.crop(x, 1))))
    return tile.crop(x, 0)


def _decoder(tile: _Tile, z):
    """vae.Decoder on one tile: latents -> images at the core."""
    cfg = tile.config
    levels = len(cfg.block_out_channels)
    _, margins, upsample, _ = decoder_margins(cfg)
    x = tile.conv("conv_in", z)
    x = tile.resnet("mid_block/resnets_0", x)
    x = tile.attention("mid_block/attentions_0", tile.crop(x, 0))
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


def _run(params, config: vae.VAEConfig, x, tile: int, part: str, size=None):
    """The tiled encoder or decoder ('encoder' | 'decoder'): (output, {GroupNorm path: (mean, var)}). x is images
    for the encoder, latents for the decoder; `tile` is in image pixels either way. size: the (rows, columns) of
    x's image at its top left (traced), the rest of x being a canvas around it; default the whole of x."""
    f = config.downscale
    batch, height, width, channels = x.shape
    size = (height, width) if size is None else size
    if part == "encoder":
        unit, align, forward = tile, f, _encoder
        read, _, after = encoder_margins(config)
        out_channels, out_size = 2 * config.latent_channels, (height // f, width // f)
    else:
        unit, align, forward = tile // f, 1, _decoder
        read, _, _, after = decoder_margins(config)
        out_channels, out_size = config.out_channels, (height * f, width * f)
    cores, counts = tile_grid(height, width, unit, align)
    out_cores = tuple(c // f if part == "encoder" else c * f for c in cores)
    latent_cores = tuple(c // f for c in cores) if part == "encoder" else cores
    tiles = counts[0] * counts[1]
    params = params[part]
    dtype = jnp.dtype(config.dtype)
    padded = jnp.pad(x.astype(dtype), ((0, 0), (read, read + counts[0] * cores[0] - height),
                                       (read, read + counts[1] * cores[1] - width), (0, 0)))
    paths = sorted({"/".join(key[:-1]) for key in traverse_util.flatten_dict(params) if key[-1] == "scale"})
    passes, keys_pass = len(paths) + 3, norms_through_attention(config, part)  # + the buffers' and output pass
    groups = (batch, config.norm_num_groups)
    # Filled like the input, so that the loop carry has its sharding type (varying inside shard_map).
    fill = lambda value, shape, dtype=jnp.float32: jax.lax.full_like(padded, value, dtype, shape)  # noqa: E731
    table = {p: (fill(0, groups), fill(1, groups)) for p in paths}
    sums = {p: fill(0, (*groups, 3)) for p in paths}
    out = fill(0, (batch, counts[0] * out_cores[0], counts[1] * out_cores[1], out_channels))
    # The attention's whole-latent buffers over the grid: rows of the normalised input a multiple of the key
    # chunk's, the residual padded by the margin that the layers after the attention read.
    mid = config.block_out_channels[-1]
    grid = (counts[0] * latent_cores[0], counts[1] * latent_cores[1])
    normed = fill(0, (batch, _round_up(grid[0], _chunk_rows(*grid)), grid[1], mid), dtype)
    residual = fill(0, (batch, grid[0] + 2 * after, grid[1] + 2 * after, mid), dtype)

    def step(i, carry):
        table, sums, out, buffers = carry
        pass_index, index = i // tiles, i % tiles
        row, col = index // counts[1], index % counts[1]
        origin = (row * cores[0], col * cores[1])
        extent = jax.lax.dynamic_slice(padded, (0, *origin, 0),
                                       (batch, cores[0] + 2 * read, cores[1] + 2 * read, channels))
        state = _Tile(params, config, origin, size, cores, read, table, buffers, after, pass_index, keys_pass)
        y = forward(state, extent).astype(jnp.float32)
        if state.stage != passes - 1 or state.stages.keys() != set(paths):
            raise ValueError(f"the {part} traced {state.stage} stages and GroupNorms {sorted(state.stages)}, "
                             f"expected {passes - 1} and {paths}")
        out = jax.lax.dynamic_update_slice(out, y, (0, row * out_cores[0], col * out_cores[1], 0))
        sums = {p: sums[p] + state.moments[p] for p in paths}
        # At the end of the pass that fills a GroupNorm its sums become its table entry.
        last = index == tiles - 1
        table = {p: jax.tree.map(lambda new, old: jnp.where(last & (pass_index == state.stages[p]), new, old),
                                 _finalize(sums[p]), table[p]) for p in paths}
        sums = {p: jnp.where(last, 0.0, sums[p]) for p in paths}
        return table, sums, out, (state.normed, state.residual)

    table, _, out, _ = jax.lax.fori_loop(0, passes * tiles, step, (table, sums, out, (normed, residual)))
    return out[:, :out_size[0], :out_size[1], :], table


def whole_bytes(config: vae.VAEConfig, height: int, width: int) -> int:
    """An upper estimate of the temporaries of an untiled encode or decode of a (height, width) image (one pass,
    `_Whole`): seven fp32 buffers of the first level's channels at full resolution (the decoder's peak; the
    encoder's is three) plus the mid-block attention's two fp32 score chunks (its N latent positions against one
    chunk of keys). XLA:CPU's memory analysis of the SD3 and the three-level VAE's decode at 256² to 1024² is the
    first term exactly, their encode 0.4 to 0.6 of it (tests/test_vae_tiling.py)."""
    rows, columns = height // config.downscale, width // config.downscale
    keys = _chunk_rows(rows, columns) * columns
    return 7 * height * width * config.block_out_channels[0] * 4 + 2 * rows * columns * keys * 4


def tile_for_budget(config: vae.VAEConfig, budget: int) -> int:
    """The VAE tile from the VAE's geometry and a memory budget (bytes): the largest square side, a multiple of
    TILE_STEP pixels, whose untiled pass fits the budget. Images up to it run whole (a pass per GroupNorm costs
    ~12x the network, so they skip it); larger ones run in tiles of it, whose temporaries do not grow with the
    image. A pixel autoencoder is pointwise in blocks and never tiles (0)."""
    if config.kind != "kl":
        return 0
    side = TILE_STEP
    while whole_bytes(config, side + TILE_STEP, side + TILE_STEP) <= budget:
        side += TILE_STEP
    return side


def _whole(params, config: vae.VAEConfig, x, size, part: str):
    """The encoder or decoder in one pass over a canvas whose image is `size` (traced) at its top left (_Whole)."""
    state = _Whole(params[part], config, size, x.shape[1:3])
    return (_encoder if part == "encoder" else _decoder)(state, x.astype(jnp.dtype(config.dtype)))


def encode(params, config: vae.VAEConfig, images, tile: int, size=None):
    """`AutoencoderKL.encode` of (B, H, W, C) images in [-1, 1] -> (mean, logvar), in tiles of `tile` pixels when
    the image exceeds them (0: whole). A pixel autoencoder always runs whole (it is pointwise in blocks).

    size: (rows, columns) in pixels, traced, multiples of the downscale: the images lie at the top left of a
    larger canvas, and the latents inside size // downscale are theirs alone (the rest is not), so one compiled
    function serves every image that fits the canvas."""
    if config.kind != "kl":
        return vae.make_autoencoder(config).apply({"params": params}, images, size, method="encode")
    _check(config, tile)
    if not needs_tiling(images.shape[1], images.shape[2], tile):
        moments = _whole(params, config, images, images.shape[1:3] if size is None else size,
                         "encoder").astype(jnp.float32)
    else:
        moments, _ = _run(params, config, images, tile, "encoder", size)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, *vae.LOGVAR_RANGE)


def decode(params, config: vae.VAEConfig, latents, tile: int, size=None):
    """`AutoencoderKL.decode` of raw (B, h, w, latent_channels) latents -> (B, h*f, w*f, C) images, in tiles of
    `tile` output pixels when the image exceeds them (0: whole). size: the image's (rows, columns) in pixels on a
    larger canvas, as in `encode`."""
    f = config.downscale
    if config.kind != "kl":
        return vae.make_autoencoder(config).apply({"params": params}, latents, size, method="decode")
    _check(config, tile)
    latent_size = None if size is None else (size[0] // f, size[1] // f)
    if not needs_tiling(latents.shape[1] * f, latents.shape[2] * f, tile):
        return _whole(params, config, latents, latents.shape[1:3] if size is None else latent_size, "decoder")
    return _run(params, config, latents, tile, "decoder", latent_size)[0]


def group_norm_statistics(params, config: vae.VAEConfig, inputs, part: str, tile: int) -> dict:
    """{GroupNorm path in the part ('encoder' | 'decoder'): (mean, var), each (B, groups) fp32} that the tiled
    output is normalised with (inputs: images for the encoder, latents for the decoder; tile > 0)."""
    if part not in ("encoder", "decoder"):
        raise ValueError(f"part must be 'encoder' or 'decoder', got {part!r}")
    _check(config, tile)
    if tile == 0:
        raise ValueError("group_norm_statistics needs a tile > 0")
    return _run(params, config, inputs, tile, part)[1]
