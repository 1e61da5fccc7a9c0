"""MANIQA no-reference quality (PIPAL checkpoint, ~0-1), exactly as pyiqa `maniqa-pipal` computes it.

Port of pyiqa archs/maniqa_arch.py and archs/maniqa_swin.py:
  * (x - 0.5) / 0.5, then, if min(H, W) <= 224, torch bilinear upscaling by 225 / min(H, W);
  * 20 uniform 224 crops (pyiqa >= 0.1.12): origins (i * step_h, j * step_w), step = (size - 224) // 4,
    i, j in 0..4 row-major, the first 20 kept;
  * timm ViT-B/8 (LN eps 1e-6, exact GELU); the tokens of blocks 6-9 without CLS, concatenated (784, 3072);
  * two stages of [2 TABs (attention across channels, with pyiqa's transpose-then-reshape quirk),
    1x1 conv, Swin stage (window 4, shift 2, relative position bias, 0.13 * layer(x) + x)];
  * score/weight heads on every token of every crop; the score is their weighted mean over all crops.

`maniqa_scores` maps float NHWC images in [0, 1] to scores; smfsr_jax.evaluation.scoring.load_maniqa
jits it once per image size.
"""

import dataclasses

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from smfsr_jax.models.attention import dot_product_attention
from smfsr_jax.models.musiq import Mlp


@dataclasses.dataclass(frozen=True)
class MANIQAConfig:
    embed_dim: int = 768  # the ViT width; the Swin stages run at embed_dim and embed_dim // 2
    vit_depth: int = 12  # blocks in the checkpoint; only those up to max(feature_blocks) run
    vit_heads: int = 12
    vit_mlp_dim: int = 3072
    vit_num_classes: int = 1000  # the ViT's unused ImageNet head, present in the checkpoint
    patch_size: int = 8
    crop_size: int = 224
    feature_blocks: tuple[int, ...] = (6, 7, 8, 9)
    num_tab: int = 2
    swin_depths: tuple[int, ...] = (2, 2)
    swin_heads: tuple[int, ...] = (4, 4)
    window_size: int = 4
    swin_mlp_dim: int = 768
    swin_scale: float = 0.13
    num_crops: int = 20

    @property
    def grid(self) -> int:
        return self.crop_size // self.patch_size


PIPAL = MANIQAConfig()  # pyiqa `maniqa-pipal` = MANIQA_PIPAL-ae6d356b.pth
# Tests: every code path at a fraction of the cost (2 crops instead of 20; ViT width 32, 10 blocks).
TINY = MANIQAConfig(embed_dim=32, vit_depth=10, vit_heads=2, vit_mlp_dim=64, vit_num_classes=10, swin_mlp_dim=32,
                    num_crops=2)


def config_from_dict(d: dict) -> MANIQAConfig:
    tuples = ("feature_blocks", "swin_depths", "swin_heads")
    return MANIQAConfig(**{k: tuple(v) if k in tuples else v for k, v in d.items()})


# ----------------------------------------------------------------------------------------------------
# Preprocessing (pyiqa arch_util.uniform_crop)


def bilinear_resize_matrix(in_size: int, out_size: int, scale_factor: float) -> np.ndarray:
    """(out, in) matrix of torch F.interpolate(scale_factor=s, mode='bilinear', align_corners=False).

    As aten in float32: the source scale is 1/s (the given factor, not in/out), source x =
    max(scale (i + 0.5) - 0.5, 0), taps floor(x) and floor(x) + 1 (clamped), weight x - floor(x).
    """
    scale = np.float32(1.0 / scale_factor)
    src = np.maximum(scale * (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5), 0)
    first = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    second = np.minimum(first + 1, in_size - 1)
    weight = np.clip(src - first.astype(np.float32), 0, 1).astype(np.float32)
    matrix = np.zeros((out_size, in_size), np.float32)
    np.add.at(matrix, (np.arange(out_size), first), np.float32(1) - weight)
    np.add.at(matrix, (np.arange(out_size), second), weight)
    return matrix


def upscale_for_crops(images: jnp.ndarray, crop_size: int) -> jnp.ndarray:
    """pyiqa's upscaling of images whose shorter side is <= crop_size, by (crop_size + 1) / shorter side."""
    _, h, w, _ = images.shape
    if min(h, w) > crop_size:
        return images
    factor = (crop_size + 1) / min(h, w)
    rows = bilinear_resize_matrix(h, int(h * factor), factor)  # torch floors size * factor
    cols = bilinear_resize_matrix(w, int(w * factor), factor)
    images = jnp.einsum("bhwc,xw->bhxc", images, cols)
    return jnp.einsum("bhwc,yh->bywc", images, rows)


def uniform_crops(images: jnp.ndarray, crop_size: int, num_crops: int) -> jnp.ndarray:
    """(B, H, W, C) -> (B * num_crops, crop, crop, C), image-major, as pyiqa's uniform_crop."""
    b, h, w, c = images.shape
    per_side = int(np.sqrt(num_crops))
    step_h, step_w = (h - crop_size) // per_side, (w - crop_size) // per_side
    count = int(np.ceil(np.sqrt(num_crops)))
    origins = [(i * step_h, j * step_w) for i in range(count) for j in range(count)][:num_crops]
    crops = [images[:, y:y + crop_size, x:x + crop_size] for y, x in origins]
    return jnp.stack(crops, axis=1).reshape(b * num_crops, crop_size, crop_size, c)


# ----------------------------------------------------------------------------------------------------
# Network


def layer_norm(epsilon: float, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=epsilon, use_fast_variance=False, name=name)


def packed_self_attention(x, num_heads: int, *, bias=None, mask=None, names=("qkv", "proj")):
    """Multi-head self-attention on tokens (B, N, C) with one packed q/k/v projection, for use inside a
    compact module (the projections become its children `names`: timm's qkv/proj, torch
    nn.MultiheadAttention's in_proj/out_proj)."""
    b, n, dim = x.shape
    qkv = nn.Dense(3 * dim, name=names[0])(x).reshape(b, n, 3, num_heads, dim // num_heads)
    y = dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], bias=bias, mask=mask)
    return nn.Dense(dim, name=names[1])(y.reshape(b, n, dim))


class ViTAttention(nn.Module):
    num_heads: int

    @nn.compact
    def __call__(self, x):
        return packed_self_attention(x, self.num_heads)


class ViTBlock(nn.Module):
    num_heads: int
    mlp_dim: int

    @nn.compact
    def __call__(self, x):
        x = x + ViTAttention(self.num_heads, name="attn")(layer_norm(1e-6, "norm1")(x))
        return x + Mlp(self.mlp_dim, name="mlp")(layer_norm(1e-6, "norm2")(x))


class VisionTransformer(nn.Module):
    """timm ViT up to the last feature block; returns the outputs of every block that ran."""

    config: MANIQAConfig

    @nn.compact
    def __call__(self, images):
        cfg = self.config
        p, dim = cfg.patch_size, cfg.embed_dim
        x = nn.Conv(dim, (p, p), strides=(p, p), padding="VALID", name="patch_embed")(images)
        x = x.reshape(x.shape[0], -1, dim)
        cls_token = self.param("cls_token", nn.initializers.zeros, (dim,))
        pos_embed = self.param("pos_embed", nn.initializers.normal(0.02), (cfg.grid ** 2 + 1, dim))
        x = jnp.concatenate([jnp.broadcast_to(cls_token, (x.shape[0], 1, dim)), x], axis=1) + pos_embed
        outputs = []
        for i in range(max(cfg.feature_blocks) + 1):
            x = ViTBlock(cfg.vit_heads, cfg.vit_mlp_dim, name=f"blocks_{i}")(x)
            outputs.append(x)
        return outputs


class TABlock(nn.Module):
    """Attention across channels: x (B, C, N) with Linear(N, N) projections over the token axis."""

    @nn.compact
    def __call__(self, x):
        b, c, n = x.shape
        q, k, v = (nn.Dense(n, name=name)(x)[:, :, None, :] for name in ("c_q", "c_k", "c_v"))
        y = dot_product_attention(q, k, v)[:, :, 0, :]  # one head of width N over C "tokens": scale N ** -0.5
        # pyiqa transposes (C, N) -> (N, C) and reshapes back to (C, N) without transposing; the checkpoint
        # was trained with this scramble, so it is kept.
        return y.transpose(0, 2, 1).reshape(b, c, n) + x


def relative_position_index(window: int) -> np.ndarray:
    """(window², window²) index into the (2 window - 1)² bias table, as Swin."""
    coords = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing="ij")).reshape(2, -1)
    relative = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0) + (window - 1)
    return relative[:, :, 0] * (2 * window - 1) + relative[:, :, 1]


def window_partition(x: jnp.ndarray, window: int) -> jnp.ndarray:
    """(B, H, W, C) -> (B * windows, window², C), batch-major then row-major windows."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // window, window, w // window, window, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window * window, c)


def window_reverse(windows: jnp.ndarray, window: int, h: int, w: int) -> jnp.ndarray:
    c = windows.shape[-1]
    x = windows.reshape(-1, h // window, w // window, window, window, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h, w, c)


def shifted_window_mask(h: int, w: int, window: int, shift: int) -> np.ndarray:
    """(windows, window², window²) additive mask: -100 between pixels from different shifted regions."""
    regions = np.zeros((1, h, w, 1), np.float32)
    bands = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    for i, (rows, cols) in enumerate((r, c) for r in bands for c in bands):
        regions[:, rows, cols, :] = i
    ids = np.asarray(window_partition(regions, window))[..., 0]
    return np.where(ids[:, None, :] != ids[:, :, None], -100.0, 0.0).astype(np.float32)


class WindowAttention(nn.Module):
    num_heads: int
    window: int

    @nn.compact
    def __call__(self, x, mask):
        b, n = x.shape[:2]
        table = self.param("relative_position_bias_table", nn.initializers.normal(0.02),
                           ((2 * self.window - 1) ** 2, self.num_heads))
        bias = table[relative_position_index(self.window).reshape(-1)].reshape(n, n, self.num_heads)
        bias = bias.transpose(2, 0, 1)[None]  # (1, heads, N, N)
        if mask is not None:  # windows are batch-major: tile the per-window mask over the images
            bias = jnp.tile(bias + mask[:, None], (b // mask.shape[0], 1, 1, 1))
        return packed_self_attention(x, self.num_heads, bias=bias)


class SwinBlock(nn.Module):
    num_heads: int
    window: int
    shift: int
    mlp_dim: int

    @nn.compact
    def __call__(self, x, h, w):
        b, n, c = x.shape
        y = layer_norm(1e-5, "norm1")(x).reshape(b, h, w, c)
        mask = None
        if self.shift:
            y = jnp.roll(y, (-self.shift, -self.shift), axis=(1, 2))
            mask = shifted_window_mask(h, w, self.window, self.shift)
        y = WindowAttention(self.num_heads, self.window, name="attn")(window_partition(y, self.window), mask)
        y = window_reverse(y, self.window, h, w)
        if self.shift:
            y = jnp.roll(y, (self.shift, self.shift), axis=(1, 2))
        x = x + y.reshape(b, n, c)
        return x + Mlp(self.mlp_dim, name="mlp")(layer_norm(1e-5, "norm2")(x))


class SwinLayer(nn.Module):
    """pyiqa maniqa_swin.BasicLayer: Swin blocks with shifts 0, window // 2, ... then conv 3x3 + ReLU."""

    depth: int
    num_heads: int
    window: int
    shift: int
    mlp_dim: int
    grid: int

    @nn.compact
    def __call__(self, x):
        b, n, c = x.shape
        for j in range(self.depth):
            shift = self.shift if j % 2 else 0
            x = SwinBlock(self.num_heads, self.window, shift, self.mlp_dim, name=f"blocks_{j}")(x, self.grid, self.grid)
        y = nn.Conv(c, (3, 3), padding=((1, 1), (1, 1)), name="conv")(x.reshape(b, self.grid, self.grid, c))
        return nn.relu(y).reshape(b, n, c)


class SwinTransformer(nn.Module):
    """pyiqa maniqa_swin.SwinTransformer at a fixed grid: x <- scale * layer(x) + x per layer; tokens (B, N, C)."""

    config: MANIQAConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        # Swin shrinks the window to the grid and drops the shift when the grid is no larger than the window.
        window = min(cfg.window_size, cfg.grid)
        shift = cfg.window_size // 2 if cfg.grid > cfg.window_size else 0
        for i, (depth, heads) in enumerate(zip(cfg.swin_depths, cfg.swin_heads)):
            layer = SwinLayer(depth, heads, window, shift, cfg.swin_mlp_dim, cfg.grid, name=f"layers_{i}")
            x = cfg.swin_scale * layer(x) + x
        return x


class MANIQA(nn.Module):
    """Crops (B * num_crops, 224, 224, 3), already normalised -> (B,) scores."""

    config: MANIQAConfig

    @nn.compact
    def __call__(self, crops):
        cfg = self.config
        blocks = VisionTransformer(cfg, name="vit")(crops)
        x = jnp.concatenate([blocks[i][:, 1:] for i in cfg.feature_blocks], axis=-1)  # (B', N, 4 dim)
        for stage, width in ((1, cfg.embed_dim), (2, cfg.embed_dim // 2)):
            x = x.transpose(0, 2, 1)  # (B', C, N)
            for i in range(cfg.num_tab):
                x = TABlock(name=f"tablock{stage}_{i}")(x)
            x = nn.Dense(width, name=f"conv{stage}")(x.transpose(0, 2, 1))  # 1x1 conv on (B', N, C)
            x = SwinTransformer(cfg, name=f"swintransformer{stage}")(x)
        half = cfg.embed_dim // 2
        score = nn.relu(nn.Dense(1, name="fc_score_3")(nn.relu(nn.Dense(half, name="fc_score_0")(x))))
        weight = nn.sigmoid(nn.Dense(1, name="fc_weight_3")(nn.relu(nn.Dense(half, name="fc_weight_0")(x))))
        score = score.reshape(-1, cfg.num_crops * x.shape[1])
        weight = weight.reshape(-1, cfg.num_crops * x.shape[1])
        return (weight * score).sum(axis=-1) / (weight.sum(axis=-1) + 1e-8)


def maniqa_scores(params, config: MANIQAConfig, images: jnp.ndarray) -> jnp.ndarray:
    """(B,) MANIQA scores of float images (B, H, W, 3) in [0, 1]; traceable (jit per image size)."""
    x = upscale_for_crops((images - 0.5) / 0.5, config.crop_size)
    crops = uniform_crops(x, config.crop_size, config.num_crops)
    return MANIQA(config).apply({"params": params}, crops)

