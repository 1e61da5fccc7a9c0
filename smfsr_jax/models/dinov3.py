"""DINOv3 ViT (Hugging Face `DINOv3ViTModel` in eval mode), flax.linen, NHWC pixels.

Tokens are [CLS, registers, patches]. 2-D RoPE rotates the patch tokens only, at the deterministic
patch centres of eval mode ((i + 0.5)/n mapped to [-1, 1]; no shift, jitter or rescale). Parameter
names mirror the Hugging Face state dict: `layer.3.attention.q_proj.weight` -> `layer_3/attention/q_proj/kernel`.
"""

import dataclasses
import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from smfsr_jax.models.attention import dot_product_attention

ACTIVATIONS = {"gelu": functools.partial(nn.gelu, approximate=False), "silu": nn.silu}


@dataclasses.dataclass(frozen=True)
class DINOv3Config:
    """Field names and defaults are those of transformers' `DINOv3ViTConfig` (eval-relevant fields only)."""
    hidden_size: int = 384
    intermediate_size: int = 1536
    num_hidden_layers: int = 12
    num_attention_heads: int = 6
    patch_size: int = 16
    num_channels: int = 3
    num_register_tokens: int = 0
    layer_norm_eps: float = 1e-5
    rope_theta: float = 100.0
    hidden_act: str = "gelu"
    use_gated_mlp: bool = False
    query_bias: bool = True
    key_bias: bool = False
    value_bias: bool = True
    proj_bias: bool = True
    mlp_bias: bool = True

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                             f"{self.num_attention_heads}")
        if self.head_dim % 4:
            raise ValueError(f"2-D RoPE needs a head dim divisible by 4, got {self.head_dim}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act must be one of {sorted(ACTIVATIONS)}, got {self.hidden_act!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_prefix_tokens(self) -> int:
        return 1 + self.num_register_tokens

    @classmethod
    def vits16(cls):
        """facebook/dinov3-vits16-pretrain-lvd1689m."""
        return cls(num_register_tokens=4)

    @classmethod
    def vitsplus16(cls):
        """facebook/dinov3-vits16plus-pretrain-lvd1689m (SwiGLU)."""
        return cls(num_register_tokens=4, use_gated_mlp=True, hidden_act="silu")

    @classmethod
    def vitb16(cls):
        """facebook/dinov3-vitb16-pretrain-lvd1689m."""
        return cls(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_register_tokens=4)

    @classmethod
    def tiny(cls):
        """Two layers of width 64 for tests and the CPU demo."""
        return cls(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                   num_register_tokens=4)


def rope_cos_sin(num_patches_h: int, num_patches_w: int, head_dim: int, theta: float):
    """(h·w, head_dim) fp32 cos and sin tables at the patch centres, computed like HF in eval mode."""
    coords_h = np.arange(0.5, num_patches_h, dtype=np.float32) / np.float32(num_patches_h)
    coords_w = np.arange(0.5, num_patches_w, dtype=np.float32) / np.float32(num_patches_w)
    coords = np.stack(np.meshgrid(coords_h, coords_w, indexing="ij"), axis=-1).reshape(-1, 2)
    coords = 2.0 * coords - 1.0
    inv_freq = 1.0 / np.float32(theta) ** (np.arange(head_dim // 4, dtype=np.float32) * np.float32(4 / head_dim))
    # (h·w, 2, head_dim/4) -> (h·w, head_dim/2): all y frequencies, then all x frequencies; repeated for both halves.
    angles = (2 * math.pi * coords[:, :, None] * inv_freq[None, None, :]).reshape(len(coords), -1)
    angles = np.tile(angles, (1, 2))
    return jnp.asarray(np.cos(angles)), jnp.asarray(np.sin(angles))


def apply_rope(x, cos, sin, num_prefix_tokens: int):
    """Rotate-half RoPE on the patch tokens of x (B, T, heads, head_dim); prefix tokens pass through. fp32."""
    prefix, patches = x[:, :num_prefix_tokens], x[:, num_prefix_tokens:].astype(jnp.float32)
    half = patches.shape[-1] // 2
    rotated = jnp.concatenate([-patches[..., half:], patches[..., :half]], axis=-1)
    patches = patches * cos[:, None, :] + rotated * sin[:, None, :]
    return jnp.concatenate([prefix, patches.astype(x.dtype)], axis=1)


def layer_norm(x, epsilon: float, dtype, name: str):
    """LayerNorm with fp32 statistics; the result is cast back to the compute dtype."""
    y = nn.LayerNorm(epsilon=epsilon, dtype=jnp.float32, param_dtype=jnp.float32, name=name)(x.astype(jnp.float32))
    return y.astype(dtype)


def _dense(features: int, use_bias: bool, dtype, name: str):
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, name=name)


class _DINOv3Module(nn.Module):
    """The fields of every DINOv3 module; `attention_implementation` as in `dot_product_attention`."""
    config: DINOv3Config
    dtype: Any = jnp.float32
    attention_implementation: str | None = None


class DINOv3Embeddings(_DINOv3Module):
    @nn.compact
    def __call__(self, pixel_values, bool_masked_pos=None):
        c = self.config
        batch = pixel_values.shape[0]
        token_init = nn.initializers.truncated_normal(0.02)
        cls_token = self.param("cls_token", token_init, (1, 1, c.hidden_size))
        mask_token = self.param("mask_token", nn.initializers.zeros, (1, 1, c.hidden_size))
        register_tokens = self.param("register_tokens", token_init, (1, c.num_register_tokens, c.hidden_size))
        patches = nn.Conv(c.hidden_size, (c.patch_size, c.patch_size), strides=(c.patch_size, c.patch_size),
                          padding="VALID", dtype=self.dtype, param_dtype=jnp.float32,
                          name="patch_embeddings")(pixel_values.astype(self.dtype))
        patches = patches.reshape(batch, -1, c.hidden_size)
        if bool_masked_pos is not None:
            patches = jnp.where(bool_masked_pos[..., None], mask_token.astype(self.dtype), patches)
        prefix = jnp.concatenate([cls_token, register_tokens], axis=1).astype(self.dtype)
        return jnp.concatenate([jnp.broadcast_to(prefix, (batch,) + prefix.shape[1:]), patches], axis=1)


class DINOv3Attention(_DINOv3Module):
    @nn.compact
    def __call__(self, x, cos, sin):
        c = self.config
        batch, tokens, _ = x.shape
        heads = (batch, tokens, c.num_attention_heads, c.head_dim)
        q = _dense(c.hidden_size, c.query_bias, self.dtype, "q_proj")(x).reshape(heads)
        k = _dense(c.hidden_size, c.key_bias, self.dtype, "k_proj")(x).reshape(heads)
        v = _dense(c.hidden_size, c.value_bias, self.dtype, "v_proj")(x).reshape(heads)
        q = apply_rope(q, cos, sin, c.num_prefix_tokens)
        k = apply_rope(k, cos, sin, c.num_prefix_tokens)
        out = dot_product_attention(q, k, v, implementation=self.attention_implementation)
        return _dense(c.hidden_size, c.proj_bias, self.dtype, "o_proj")(out.reshape(batch, tokens, -1))


class DINOv3MLP(_DINOv3Module):
    @nn.compact
    def __call__(self, x):
        c = self.config
        act = ACTIVATIONS[c.hidden_act]
        up = _dense(c.intermediate_size, c.mlp_bias, self.dtype, "up_proj")(x)
        if c.use_gated_mlp:
            hidden = act(_dense(c.intermediate_size, c.mlp_bias, self.dtype, "gate_proj")(x)) * up
        else:
            hidden = act(up)
        return _dense(c.hidden_size, c.mlp_bias, self.dtype, "down_proj")(hidden)


class LayerScale(nn.Module):
    @nn.compact
    def __call__(self, x):
        lambda1 = self.param("lambda1", nn.initializers.ones, (x.shape[-1],))
        return x * lambda1.astype(x.dtype)


class DINOv3Layer(_DINOv3Module):
    @nn.compact
    def __call__(self, x, cos, sin):
        c = self.config
        h = layer_norm(x, c.layer_norm_eps, self.dtype, "norm1")
        h = DINOv3Attention(c, self.dtype, self.attention_implementation, name="attention")(h, cos, sin)
        x = x + LayerScale(name="layer_scale1")(h)
        h = layer_norm(x, c.layer_norm_eps, self.dtype, "norm2")
        h = DINOv3MLP(c, self.dtype, name="mlp")(h)
        return x + LayerScale(name="layer_scale2")(h)


class DINOv3ViT(_DINOv3Module):
    """`apply({'params': p}, pixel_values)` with ImageNet-normalised NHWC pixels -> (B, 1 + R + h·w, D), the
    final-normed sequence (HF `last_hidden_state`).

    `return_taps` (HF `hidden_states` numbering: 0 = embedding output, i = output of layer i - 1) also returns
    those un-normed hidden states: `(last_hidden_state, taps)`. `bool_masked_pos` (B, h·w) swaps in the mask token.
    """

    @nn.compact
    def __call__(self, pixel_values, bool_masked_pos=None, return_taps: Sequence[int] = ()):
        c = self.config
        if pixel_values.ndim != 4 or pixel_values.shape[-1] != c.num_channels:
            raise ValueError(f"pixel_values must be (B, H, W, {c.num_channels}) NHWC, got {pixel_values.shape}")
        bad_taps = [i for i in return_taps if not 0 <= i <= c.num_hidden_layers]
        if bad_taps:
            raise ValueError(f"return_taps {bad_taps} out of range 0..{c.num_hidden_layers}")
        _, height, width, _ = pixel_values.shape
        cos, sin = rope_cos_sin(height // c.patch_size, width // c.patch_size, c.head_dim, c.rope_theta)
        x = DINOv3Embeddings(c, self.dtype, name="embeddings")(pixel_values, bool_masked_pos)
        hidden_states = [x]
        for i in range(c.num_hidden_layers):
            x = DINOv3Layer(c, self.dtype, self.attention_implementation, name=f"layer_{i}")(x, cos, sin)
            hidden_states.append(x)
        last_hidden_state = layer_norm(x, c.layer_norm_eps, self.dtype, "norm")
        if not return_taps:
            return last_hidden_state
        return last_hidden_state, tuple(hidden_states[i] for i in return_taps)


def abstract_params(config: DINOv3Config):
    """The parameter tree as jax.ShapeDtypeStructs (no memory)."""
    pixels = jnp.zeros((1, config.patch_size, config.patch_size, config.num_channels), jnp.float32)
    return jax.eval_shape(DINOv3ViT(config).init, jax.random.key(0), pixels)["params"]
