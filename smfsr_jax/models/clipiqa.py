"""CLIPIQA no-reference quality (0-1), exactly as pyiqa `clipiqa` computes it with OpenAI CLIP RN50.

Port of pyiqa archs/clipiqa_arch.py and archs/clip_model.py:
  * CLIP mean/std normalisation at native resolution (no resize, no crop);
  * ModifiedResNet: 3-conv stem + avg-pool, bottleneck stages with avg-pool before strided 1x1 convs,
    BatchNorm in eval mode; attention pool whose query is the mean token, without positional embedding
    (pyiqa's pos_embedding=False), so any image size works;
  * logits = exp(logit_scale) cos(image, text) against five antonym prompt pairs, softmax within each
    pair, P(positive) averaged over the five.
The text features are constants of the weights: the converter computes them once with `TextTransformer`
and stores them instead of the text tower. `clipiqa_scores` maps float NHWC images in [0, 1] to scores;
smfsr_jax.evaluation.scoring.load_clipiqa jits it once per image size.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from smfsr_jax.models.attention import dot_product_attention
from smfsr_jax.models.maniqa import packed_self_attention

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PROMPT_PAIRS = (("Good image", "bad image"), ("Sharp image", "blurry image"), ("sharp edges", "blurry edges"),
                ("High resolution image", "low resolution image"), ("Noise-free image", "noisy image"))
# OpenAI CLIP BPE ids of the ten prompts in pair order (start 49406, end 49407). The BPE vocabulary is not
# available offline; tools/make_iqa_goldens.py records clip.tokenize's ids and the tests compare.
PROMPT_TOKEN_IDS = (
    (49406, 886, 2867, 49407), (49406, 2103, 2867, 49407),
    (49406, 8157, 2867, 49407), (49406, 21977, 2867, 49407),
    (49406, 8157, 20938, 49407), (49406, 21977, 20938, 49407),
    (49406, 1400, 9977, 2867, 49407), (49406, 1042, 9977, 2867, 49407),
    (49406, 9307, 268, 1139, 2867, 49407), (49406, 33495, 2867, 49407),
)


@dataclasses.dataclass(frozen=True)
class CLIPIQAConfig:
    vision_layers: tuple[int, ...] = (3, 4, 6, 3)
    vision_width: int = 64
    embed_dim: int = 1024
    image_resolution: int = 224  # sizes the attention pool's positional embedding, unused by CLIPIQA
    context_length: int = 77
    vocab_size: int = 49408
    text_width: int = 512
    text_layers: int = 12

    @property
    def vision_heads(self) -> int:
        return self.vision_width * 32 // 64  # as CLIP's build_model

    @property
    def text_heads(self) -> int:
        return self.text_width // 64


RN50 = CLIPIQAConfig()  # OpenAI RN50.pt
TINY = CLIPIQAConfig(vision_layers=(1, 1, 1, 1), vision_width=8, embed_dim=32, text_width=64, text_layers=2)


def config_from_dict(d: dict) -> CLIPIQAConfig:
    return CLIPIQAConfig(**{**d, "vision_layers": tuple(d["vision_layers"])})


def prompt_tokens(context_length: int) -> np.ndarray:
    """(10, context_length) int32 token ids, zero-padded as clip.tokenize."""
    tokens = np.zeros((len(PROMPT_TOKEN_IDS), context_length), np.int32)
    for i, ids in enumerate(PROMPT_TOKEN_IDS):
        tokens[i, :len(ids)] = ids
    return tokens


# ----------------------------------------------------------------------------------------------------
# Image tower (CLIP ModifiedResNet)


class BatchNorm(nn.Module):
    """Eval-mode BatchNorm2d (eps 1e-5) with its running statistics as parameters."""

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        mean = self.param("mean", nn.initializers.zeros, (c,))
        var = self.param("var", nn.initializers.ones, (c,))
        return (x - mean) / jnp.sqrt(var + 1e-5) * scale + bias


def conv(features: int, kernel: int, name: str, stride: int = 1) -> nn.Conv:
    pad = kernel // 2
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                   use_bias=False, name=name)


def avg_pool(x, size: int):
    """torch AvgPool2d(size): stride = size, no padding, trailing rows/columns dropped."""
    return nn.avg_pool(x, (size, size), strides=(size, size), padding="VALID") if size > 1 else x


class Bottleneck(nn.Module):
    """CLIP Bottleneck: strided blocks avg-pool after conv2 and before the shortcut's 1x1 conv."""

    planes: int
    stride: int = 1

    @nn.compact
    def __call__(self, x):
        out = nn.relu(BatchNorm(name="bn1")(conv(self.planes, 1, "conv1")(x)))
        out = nn.relu(BatchNorm(name="bn2")(conv(self.planes, 3, "conv2")(out)))
        out = BatchNorm(name="bn3")(conv(4 * self.planes, 1, "conv3")(avg_pool(out, self.stride)))
        identity = x
        if self.stride > 1 or x.shape[-1] != 4 * self.planes:
            identity = conv(4 * self.planes, 1, "downsample_0")(avg_pool(x, self.stride))
            identity = BatchNorm(name="downsample_1")(identity)
        return nn.relu(out + identity)


class AttentionPool(nn.Module):
    """CLIP AttentionPool2d without positional embedding: the mean token attends to [mean, all tokens]."""

    num_heads: int
    output_dim: int

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        tokens = x.reshape(b, h * w, c)
        tokens = jnp.concatenate([tokens.mean(axis=1, keepdims=True), tokens], axis=1)
        heads = lambda t: t.reshape(b, t.shape[1], self.num_heads, c // self.num_heads)
        q = heads(nn.Dense(c, name="q_proj")(tokens[:, :1]))
        k = heads(nn.Dense(c, name="k_proj")(tokens))
        v = heads(nn.Dense(c, name="v_proj")(tokens))
        y = dot_product_attention(q, k, v).reshape(b, c)
        return nn.Dense(self.output_dim, name="c_proj")(y)


class ModifiedResNet(nn.Module):
    config: CLIPIQAConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        width = cfg.vision_width
        for i, (features, stride) in enumerate(((width // 2, 2), (width // 2, 1), (width, 1)), start=1):
            x = nn.relu(BatchNorm(name=f"bn{i}")(conv(features, 3, f"conv{i}", stride)(x)))
        x = avg_pool(x, 2)
        for stage, blocks in enumerate(cfg.vision_layers, start=1):
            planes = width * 2 ** (stage - 1)
            for j in range(blocks):
                stride = 2 if (stage > 1 and j == 0) else 1
                x = Bottleneck(planes, stride, name=f"layer{stage}_{j}")(x)
        return AttentionPool(cfg.vision_heads, cfg.embed_dim, name="attnpool")(x)


# ----------------------------------------------------------------------------------------------------
# Text tower (used once, by the converter)


def layer_norm(name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, name=name)


class MultiheadAttention(nn.Module):
    """torch nn.MultiheadAttention (packed in_proj) with a causal mask."""

    num_heads: int

    @nn.compact
    def __call__(self, x):
        n = x.shape[1]
        causal = jnp.tril(jnp.ones((n, n), bool))[None, None]
        return packed_self_attention(x, self.num_heads, mask=causal, names=("in_proj", "out_proj"))


class QuickGELUMlp(nn.Module):
    @nn.compact
    def __call__(self, x):
        y = nn.Dense(4 * x.shape[-1], name="c_fc")(x)
        return nn.Dense(x.shape[-1], name="c_proj")(y * jax.nn.sigmoid(1.702 * y))


class ResidualAttentionBlock(nn.Module):
    num_heads: int

    @nn.compact
    def __call__(self, x):
        x = x + MultiheadAttention(self.num_heads, name="attn")(layer_norm("ln_1")(x))
        return x + QuickGELUMlp(name="mlp")(layer_norm("ln_2")(x))


class TextTransformer(nn.Module):
    """CLIP encode_text: tokens (B, context) -> (B, embed_dim) features at the end token (the largest id)."""

    config: CLIPIQAConfig

    @nn.compact
    def __call__(self, tokens):
        cfg = self.config
        x = nn.Embed(cfg.vocab_size, cfg.text_width, name="token_embedding")(tokens)
        x = x + self.param("positional_embedding", nn.initializers.normal(0.01), (cfg.context_length, cfg.text_width))
        for i in range(cfg.text_layers):
            x = ResidualAttentionBlock(cfg.text_heads, name=f"resblocks_{i}")(x)
        x = layer_norm("ln_final")(x)
        projection = self.param("text_projection", nn.initializers.normal(cfg.text_width ** -0.5),
                                (cfg.text_width, cfg.embed_dim))
        return x[jnp.arange(x.shape[0]), jnp.argmax(tokens, axis=-1)] @ projection


# ----------------------------------------------------------------------------------------------------
# Metric


class CLIPIQA(nn.Module):
    """CLIP-normalised images (B, H, W, 3) -> (B,) scores, against the stored prompt features."""

    config: CLIPIQAConfig

    @nn.compact
    def __call__(self, images):
        cfg = self.config
        text_features = self.param("text_features", nn.initializers.normal(1.0), (len(PROMPT_TOKEN_IDS), cfg.embed_dim))
        logit_scale = self.param("logit_scale", nn.initializers.constant(np.log(100.0)), ())
        image_features = ModifiedResNet(cfg, name="visual")(images)
        image_features = image_features / jnp.linalg.norm(image_features, axis=-1, keepdims=True)
        text_features = text_features / jnp.linalg.norm(text_features, axis=-1, keepdims=True)
        logits = jnp.exp(logit_scale) * image_features @ text_features.T
        probs = jax.nn.softmax(logits.reshape(-1, len(PROMPT_PAIRS), 2), axis=-1)
        return probs[..., 0].mean(axis=-1)


def clipiqa_scores(params, config: CLIPIQAConfig, images: jnp.ndarray) -> jnp.ndarray:
    """(B,) CLIPIQA scores of float images (B, H, W, 3) in [0, 1]; traceable (jit per image size)."""
    x = (images - np.float32(CLIP_MEAN)) / np.float32(CLIP_STD)
    return CLIPIQA(config).apply({"params": params}, x)

