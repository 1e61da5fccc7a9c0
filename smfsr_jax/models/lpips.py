"""LPIPS v0.1 with torchvision AlexNet (evaluation) or VGG16 (training loss) trunks.

AlexNet is pyiqa's `lpips` metric, VGG16 the LPIPS of SMFSR's reconstruction loss (Eq. 19). Inputs are NHWC
in [-1, 1] (map [0, 1] images with 2x - 1). Parameter paths mirror the torch names: trunk convs
`features_<torchvision index>/{kernel,bias}`, lin heads `lin<i>/kernel` (lpips' `lin<i>.model.1`).
Differentiable and jit-able, fp32.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

NETS = ("alex", "vgg")
SCALING_SHIFT = (-0.030, -0.088, -0.188)
SCALING_SCALE = (0.458, 0.448, 0.450)
NORM_EPS = 1e-10
# Floor under the squared norm: keeps the gradient finite where a tap is all zero after ReLU; the forward
# value there is 0 either way.
NORM_SQUARED_FLOOR = 1e-30


@dataclasses.dataclass(frozen=True)
class TrunkConv:
    """One conv of torchvision's `features`, followed by ReLU."""

    index: int  # position in torchvision's `features` Sequential
    in_channels: int
    out_channels: int
    kernel: int
    stride: int
    padding: int
    pool_before: bool  # a max-pool precedes this conv
    tap: bool  # an LPIPS tap reads this conv's ReLU output


ALEXNET_FEATURES = (
    TrunkConv(0, 3, 64, 11, 4, 2, pool_before=False, tap=True),
    TrunkConv(3, 64, 192, 5, 1, 2, pool_before=True, tap=True),
    TrunkConv(6, 192, 384, 3, 1, 1, pool_before=True, tap=True),
    TrunkConv(8, 384, 256, 3, 1, 1, pool_before=False, tap=True),
    TrunkConv(10, 256, 256, 3, 1, 1, pool_before=False, tap=True),
)


def _vgg16_features() -> tuple[TrunkConv, ...]:
    """torchvision vgg16 `features` (conv, ReLU pairs; 'M' max-pools); taps relu1_2 ... relu5_3."""
    cfg = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
    convs, index, in_channels, pool_before = [], 0, 3, False
    for position, item in enumerate(cfg):
        if item == "M":
            index, pool_before = index + 1, True
            continue
        tap = position + 1 == len(cfg) or cfg[position + 1] == "M"
        convs.append(TrunkConv(index, in_channels, item, 3, 1, 1, pool_before=pool_before, tap=tap))
        index, in_channels, pool_before = index + 2, item, False
    return tuple(convs)


VGG16_FEATURES = _vgg16_features()
TRUNK_FEATURES = {"alex": ALEXNET_FEATURES, "vgg": VGG16_FEATURES}
# torchvision max-pool (window, stride): floor mode, no padding.
TRUNK_POOL = {"alex": (3, 2), "vgg": (2, 2)}


@dataclasses.dataclass(frozen=True)
class LPIPSConfig:
    net: str = "alex"

    def __post_init__(self):
        if self.net not in NETS:
            raise ValueError(f"LPIPSConfig.net must be one of {NETS}, got {self.net!r}")

    @property
    def features(self) -> tuple[TrunkConv, ...]:
        return TRUNK_FEATURES[self.net]

    @property
    def tap_channels(self) -> tuple[int, ...]:
        return tuple(conv.out_channels for conv in self.features if conv.tap)


def unit_normalize(features: jax.Array) -> jax.Array:
    """f / (||f||_channels + 1e-10), per position."""
    squared = jnp.sum(features * features, axis=-1, keepdims=True)
    return features / (jnp.sqrt(jnp.maximum(squared, NORM_SQUARED_FLOOR)) + NORM_EPS)


class LPIPS(nn.Module):
    """distance(images_a, images_b) -> (N,) for NHWC images in [-1, 1]; lower is more similar."""

    config: LPIPSConfig

    def trunk(self, images: jax.Array) -> list[jax.Array]:
        window, stride = TRUNK_POOL[self.config.net]
        x = (images - jnp.asarray(SCALING_SHIFT, images.dtype)) / jnp.asarray(SCALING_SCALE, images.dtype)
        taps = []
        for conv in self.config.features:
            if conv.pool_before:
                x = nn.max_pool(x, (window, window), strides=(stride, stride), padding="VALID")
            x = nn.Conv(conv.out_channels, (conv.kernel, conv.kernel), strides=(conv.stride, conv.stride),
                        padding=((conv.padding, conv.padding), (conv.padding, conv.padding)),
                        name=f"features_{conv.index}")(x)
            x = nn.relu(x)
            if conv.tap:
                taps.append(x)
        return taps

    @nn.compact
    def __call__(self, images_a: jax.Array, images_b: jax.Array) -> jax.Array:
        if images_a.shape != images_b.shape:
            raise ValueError(f"LPIPS compares images of one shape, got {images_a.shape} and {images_b.shape}")
        count = images_a.shape[0]
        # One trunk pass over both batches.
        taps = self.trunk(jnp.concatenate([images_a, images_b], axis=0))
        distance = jnp.zeros((count,), images_a.dtype)
        for i, features in enumerate(taps):
            features = unit_normalize(features)
            squared_difference = (features[:count] - features[count:]) ** 2
            weighted = nn.Conv(1, (1, 1), use_bias=False, name=f"lin{i}")(squared_difference)
            distance = distance + jnp.mean(weighted, axis=(1, 2, 3))
        return distance
