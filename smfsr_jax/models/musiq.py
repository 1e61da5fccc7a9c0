"""MUSIQ no-reference quality (KonIQ-10k checkpoint, 0-100 scale), exactly as pyiqa `musiq` computes it.

Port of pyiqa archs/musiq_arch.py and data/multiscale_trans_util.py:
  * x in [0, 1] -> 2x - 1; scales "longer side 224", "longer side 384" (torch bicubic, a = -0.75,
    align_corners False, no antialias) and the native image;
  * per scale, 32x32 patches (TF-SAME padding split as pad//2 before, the rest after), each with a hashed
    10x10 spatial position, a scale id and a mask; the 224/384 scales are padded to 49/144 tokens;
  * per patch a weight-standardised ResNet stem (conv 7x7/2, GN, ReLU, max-pool 3/2, one bottleneck)
    flattened HWC -> Linear(16384, 384); then CLS + 14 pre-LN transformer blocks, final LN, Linear on CLS.

`musiq_scores` maps float NHWC images in [0, 1] to scores. Token counts depend on the image size, so it
is jitted once per size (smfsr_jax.evaluation.scoring.load_musiq groups the images by size).
"""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from smfsr_jax.models.attention import dot_product_attention

STEM_WIDTH = 64  # pyiqa's resnet_token_dim: fixed, not a checkpoint option
CUBIC_A = -0.75  # torch's bicubic kernel constant


@dataclasses.dataclass(frozen=True)
class MUSIQConfig:
    hidden_size: int = 384
    mlp_dim: int = 1152
    num_heads: int = 6
    num_layers: int = 14
    patch_size: int = 32
    hash_grid_size: int = 10
    longer_side_lengths: tuple[int, ...] = (224, 384)

    @property
    def num_scales(self) -> int:
        return len(self.longer_side_lengths) + 1  # plus the native resolution


KONIQ = MUSIQConfig()  # pyiqa `musiq` = musiq_koniq_ckpt-e95806b9.pth
TINY = MUSIQConfig(hidden_size=32, mlp_dim=64, num_heads=2, num_layers=2)  # tests: same stem, small transformer


def config_from_dict(d: dict) -> MUSIQConfig:
    return MUSIQConfig(**{**d, "longer_side_lengths": tuple(d["longer_side_lengths"])})


# ----------------------------------------------------------------------------------------------------
# Preprocessing (pyiqa get_multiscale_patches)


def bicubic_resize_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) matrix of torch's bicubic interpolation, align_corners False, no antialias.

    Follows aten's upsample_bicubic2d in float32: source x = (in/out)(i + 0.5) - 0.5 (not clamped),
    the four taps floor(x) - 1 ... floor(x) + 2 clamped to the border, cubic convolution with a = -0.75.
    """
    a = np.float32(CUBIC_A)
    scale = np.float32(in_size) / np.float32(out_size)
    src = scale * (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5)
    base = np.floor(src)
    t = src - base

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    one = np.float32(1)
    weights = np.stack([far(t + one), near(t), near(one - t), far(one - t + one)], axis=1)
    taps = np.clip(base.astype(np.int64)[:, None] + np.arange(-1, 3)[None, :], 0, in_size - 1)
    matrix = np.zeros((out_size, in_size), np.float32)
    for j in range(4):
        np.add.at(matrix, (np.arange(out_size), taps[:, j]), weights[:, j])
    return matrix


def resize_bicubic(images: jnp.ndarray, height: int, width: int) -> jnp.ndarray:
    """torch F.interpolate(mode='bicubic', align_corners=False) on NHWC images."""
    rows = bicubic_resize_matrix(images.shape[1], height)
    cols = bicubic_resize_matrix(images.shape[2], width)
    images = jnp.einsum("bhwc,xw->bhxc", images, cols)
    return jnp.einsum("bhwc,yh->bywc", images, rows)


def nearest_indices(in_size: int, out_size: int) -> np.ndarray:
    """Source indices of torch's 'nearest' 1-D interpolation (float32 scale, floorf, as aten)."""
    if out_size == in_size:
        return np.arange(out_size)
    if out_size == 2 * in_size:
        return np.arange(out_size) >> 1
    scale = np.float32(in_size) / np.float32(out_size)
    index = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(index, in_size - 1)


def hashed_positions(count_h: int, count_w: int, grid_size: int) -> np.ndarray:
    """Hashed spatial position (row * grid + col on a grid x grid table) of each patch, row-major."""
    rows = nearest_indices(grid_size, count_h)
    cols = nearest_indices(grid_size, count_w)
    return (rows[:, None] * grid_size + cols[None, :]).reshape(-1)


def scale_tokens(images: jnp.ndarray, patch_size: int, grid_size: int, scale_id: int, max_len: int | None):
    """Patches (B, N, p, p, 3) of one scale plus their (N,) spatial positions, scale ids and mask.

    TF-SAME padding puts pad // 2 rows/columns before the image and the rest after; max_len pads with
    zero tokens (mask 0) or cuts; None keeps every patch (native scale).
    """
    b, h, w, c = images.shape
    count_h, count_w = math.ceil(h / patch_size), math.ceil(w / patch_size)
    pad_h, pad_w = count_h * patch_size - h, count_w * patch_size - w
    images = jnp.pad(images, ((0, 0), (pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2), (0, 0)))
    patches = images.reshape(b, count_h, patch_size, count_w, patch_size, c).transpose(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(b, count_h * count_w, patch_size, patch_size, c)
    n = count_h * count_w
    spatial = hashed_positions(count_h, count_w, grid_size).astype(np.int32)
    scale = np.full(n, scale_id, np.int32)
    mask = np.ones(n, np.int32)
    if max_len is not None:  # padding tokens are all zero: pixels, position, scale id and mask
        keep = min(n, max_len)
        patches = jnp.pad(patches[:, :keep], ((0, 0), (0, max_len - keep), (0, 0), (0, 0), (0, 0)))
        spatial, scale, mask = (np.pad(a[:keep], (0, max_len - keep)) for a in (spatial, scale, mask))
    return patches, spatial, scale, mask


def multiscale_tokens(images: jnp.ndarray, config: MUSIQConfig):
    """pyiqa get_multiscale_patches on images already mapped to [-1, 1] (B, H, W, 3).

    Returns patches (B, N, p, p, 3) and numpy (N,) spatial positions, scale ids and mask.
    """
    _, h, w, _ = images.shape
    parts = []
    for scale_id, longer in enumerate(sorted(config.longer_side_lengths)):
        ratio = longer / max(h, w)
        resized = resize_bicubic(images, round(h * ratio), round(w * ratio))
        max_len = math.ceil(longer / config.patch_size) ** 2
        parts.append(scale_tokens(resized, config.patch_size, config.hash_grid_size, scale_id, max_len))
    parts.append(scale_tokens(images, config.patch_size, config.hash_grid_size, len(config.longer_side_lengths),
                              None))
    patches, spatial, scales, mask = zip(*parts)
    return jnp.concatenate(patches, axis=1), np.concatenate(spatial), np.concatenate(scales), np.concatenate(mask)


# ----------------------------------------------------------------------------------------------------
# Network (pyiqa archs/musiq_arch.py)


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF 'SAME' padding as pyiqa's exact_padding_2d: pad // 2 before, the rest after."""
    pad = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return pad // 2, pad - pad // 2


class StdConv(nn.Module):
    """Weight-standardised conv without bias: (w - mean) / (unbiased std + 1e-5) over (kh, kw, in)."""

    features: int
    kernel_size: int
    stride: int = 1

    @nn.compact
    def __call__(self, x):
        k = self.kernel_size
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, x.shape[-1], self.features))
        kernel = kernel - kernel.mean(axis=(0, 1, 2), keepdims=True)
        kernel = kernel / (kernel.std(axis=(0, 1, 2), ddof=1, keepdims=True) + 1e-5)
        padding = [same_padding(x.shape[1], k, self.stride), same_padding(x.shape[2], k, self.stride)]
        return jax.lax.conv_general_dilated(x, kernel, (self.stride, self.stride), padding,
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))


def group_norm(epsilon: float, name: str) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, epsilon=epsilon, use_fast_variance=False, name=name)


class Bottleneck(nn.Module):
    """pyiqa MUSIQ Bottleneck (width = input channels, stride 1, projection shortcut)."""

    features: int

    @nn.compact
    def __call__(self, x):
        width = x.shape[-1]
        identity = group_norm(1e-4, "gn_proj")(StdConv(self.features, 1, name="conv_proj")(x))
        x = nn.relu(group_norm(1e-4, "gn1")(StdConv(width, 1, name="conv1")(x)))
        x = nn.relu(group_norm(1e-4, "gn2")(StdConv(width, 3, name="conv2")(x)))
        x = group_norm(1e-4, "gn3")(StdConv(self.features, 1, name="conv3")(x))
        return nn.relu(x + identity)


class MultiHeadAttention(nn.Module):
    num_heads: int

    @nn.compact
    def __call__(self, x, mask):
        b, n, dim = x.shape
        heads = lambda t: t.reshape(b, n, self.num_heads, dim // self.num_heads)
        q = heads(nn.Dense(dim, name="query")(x))
        k = heads(nn.Dense(dim, name="key")(x))
        v = heads(nn.Dense(dim, name="value")(x))
        # pyiqa fills padded keys with -1e3 logits: their softmax weight underflows to exactly 0 either way.
        y = dot_product_attention(q, k, v, mask=mask[:, None, None, :])
        return nn.Dense(dim, name="out")(y.reshape(b, n, dim))


class Mlp(nn.Module):
    """fc1 -> exact GELU -> fc2 (timm/pyiqa Mlp; also MANIQA's ViT and Swin blocks)."""

    hidden_dim: int

    @nn.compact
    def __call__(self, x):
        y = nn.gelu(nn.Dense(self.hidden_dim, name="fc1")(x), approximate=False)
        return nn.Dense(x.shape[-1], name="fc2")(y)


class TransformerBlock(nn.Module):
    mlp_dim: int
    num_heads: int

    @nn.compact
    def __call__(self, x, mask):
        layer_norm = lambda name: nn.LayerNorm(epsilon=1e-6, use_fast_variance=False, name=name)
        x = x + MultiHeadAttention(self.num_heads, name="attention")(layer_norm("norm1")(x), mask)
        return x + Mlp(self.mlp_dim, name="mlp")(layer_norm("norm2")(x))


class TransformerEncoder(nn.Module):
    config: MUSIQConfig

    @nn.compact
    def __call__(self, x, spatial_positions, scale_positions, mask):
        cfg = self.config
        dim = cfg.hidden_size
        position_emb = self.param("position_emb", nn.initializers.normal(0.02), (cfg.hash_grid_size ** 2, dim))
        scale_emb = self.param("scale_emb", nn.initializers.normal(0.02), (cfg.num_scales, dim))
        cls = self.param("cls", nn.initializers.zeros, (dim,))
        x = x + position_emb[spatial_positions] + scale_emb[scale_positions]
        x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, dim)), x], axis=1)
        mask = jnp.broadcast_to(jnp.concatenate([jnp.ones(1, bool), jnp.asarray(mask, bool)]), x.shape[:2])
        for i in range(cfg.num_layers):
            x = TransformerBlock(cfg.mlp_dim, cfg.num_heads, name=f"encoderblock_{i}")(x, mask)
        return nn.LayerNorm(epsilon=1e-6, use_fast_variance=False, name="encoder_norm")(x)


class MUSIQ(nn.Module):
    """Patch tokens (B, N, p, p, 3) in [-1, 1] + (N,) positions, scale ids, mask -> (B,) scores."""

    config: MUSIQConfig

    @nn.compact
    def __call__(self, patches, spatial_positions, scale_positions, mask):
        cfg = self.config
        b, n = patches.shape[:2]
        x = patches.reshape(b * n, *patches.shape[2:])
        x = StdConv(STEM_WIDTH, 7, 2, name="conv_root")(x)
        x = nn.relu(group_norm(1e-6, "gn_root")(x))
        # Max-pool 3/2 after zero "same" padding (values are >= 0 after the ReLU).
        pad = [(0, 0), same_padding(x.shape[1], 3, 2), same_padding(x.shape[2], 3, 2), (0, 0)]
        x = nn.max_pool(jnp.pad(x, pad), (3, 3), strides=(2, 2))
        x = Bottleneck(4 * STEM_WIDTH, name="block1")(x)
        x = nn.Dense(cfg.hidden_size, name="embedding")(x.reshape(b, n, -1))  # HWC flattening, as TF
        x = TransformerEncoder(cfg, name="transformer_encoder")(x, spatial_positions, scale_positions, mask)
        return nn.Dense(1, name="head")(x[:, 0])[:, 0]


def musiq_scores(params, config: MUSIQConfig, images: jnp.ndarray) -> jnp.ndarray:
    """(B,) MUSIQ scores of float images (B, H, W, 3) in [0, 1]; traceable (jit per image size)."""
    patches, spatial, scales, mask = multiscale_tokens((images - 0.5) * 2, config)
    return MUSIQ(config).apply({"params": params}, patches, spatial, scales, mask)

