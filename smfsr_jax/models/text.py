"""SD3 text encoders (CLIP-L, CLIP-G, T5-XXL v1.1 encoder) and SD3 prompt assembly.

`CLIPTextEncoder` matches transformers' `CLIPTextModelWithProjection` and `T5Encoder` its `T5EncoderModel`.
`encode_prompts` reproduces diffusers' `StableDiffusion3Pipeline.encode_prompt` (clip_skip None, one image
per prompt, no negative prompt). Parameter trees mirror the transformers names; layers are stacked for
`nn.scan` (leading layer axis).
"""

import dataclasses
import functools
import os
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from smfsr_jax.core import files
from smfsr_jax.models.attention import dot_product_attention

CLIP_MAX_LENGTH = 77  # SD3 pads and truncates both CLIP prompts to 77 tokens
TOKENIZER_DIRS = ("tokenizer", "tokenizer_2", "tokenizer_3")

# SMFSR test-time caption rule (wzhu121/SMFSR test/test_wollava.py `remove_focus_sentences` + `added_prompt`).
CAPTION_BANNED_WORDS = ("focus", "focal", "prominent", "close-up", "black and white", "blur", "depth", "dense",
                        "locate", "position")
CAPTION_SUFFIX = ("Cinematic, hyper sharpness, highly detailed, perfect without deformations, camera, hyper detailed "
                  "photo - realistic maximum detail, 32k, Color Grading, ultra HD, extreme meticulous detailing, "
                  "skin pore detailing. ")
NEGATIVE_PROMPT = ("motion blur, noisy, dotted, bokeh, pointed, CG Style, 3D render, unreal engine, blurring, dirty, "
                   "messy, worst quality, low quality, frames, watermark, signature, jpeg artifacts, deformed, lowres, "
                   "chaotic")


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """transformers `CLIPTextConfig` fields that change the forward pass (same names)."""
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"  # 'quick_gelu' (OpenAI CLIP-L) | 'gelu' (OpenCLIP bigG, exact erf)
    layer_norm_eps: float = 1e-5
    projection_dim: int = 768
    # 2 selects transformers' legacy pooling (argmax of the token ids, i.e. the highest id = EOS); any other
    # value pools at the first occurrence of that id. Both give the first EOS for the real CLIP vocabulary.
    eos_token_id: int = 2

    def __post_init__(self):
        if self.hidden_act not in _CLIP_ACTIVATIONS:
            raise ValueError(f"hidden_act must be one of {sorted(_CLIP_ACTIVATIONS)}, got {self.hidden_act!r}")
        if not isinstance(self.eos_token_id, int):
            raise ValueError(f"eos_token_id must be one int, got {self.eos_token_id!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of {self.num_attention_heads} heads")

    @classmethod
    def clip_l(cls, **overrides) -> "CLIPTextConfig":
        """OpenAI ViT-L/14 text tower (SD3 `text_encoder`)."""
        return cls(**overrides)

    @classmethod
    def clip_g(cls, **overrides) -> "CLIPTextConfig":
        """OpenCLIP bigG/14 text tower (SD3 `text_encoder_2`)."""
        return cls(**{**dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                             hidden_act="gelu", projection_dim=1280), **overrides})


@dataclasses.dataclass(frozen=True)
class T5Config:
    """transformers `T5Config` fields of the v1.1 encoder (gated-GELU, tanh approximation; same names)."""
    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6

    @classmethod
    def t5_xxl(cls, **overrides) -> "T5Config":
        """google/t5-v1_1-xxl encoder (SD3 `text_encoder_3`)."""
        return cls(**overrides)


def config_from_dict(cls, record: dict):
    """CLIPTextConfig or T5Config from `dataclasses.asdict` output (e.g. a converted directory's JSON)."""
    unknown = sorted(set(record) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {unknown}")
    return cls(**record)


def quick_gelu(x):
    return x * jax.nn.sigmoid(1.702 * x)


_CLIP_ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": functools.partial(jax.nn.gelu, approximate=False)}


def _split_heads(x, heads: int):
    return x.reshape(x.shape[:-1] + (heads, -1))


# ---------------------------------------------------------------------------------------------- CLIP


class _CLIPModule(nn.Module):
    """The fields of every CLIP module; `attention` picks the `dot_product_attention` implementation."""
    config: CLIPTextConfig
    dtype: Any = jnp.float32
    attention: str | None = None


class CLIPAttention(_CLIPModule):
    @nn.compact
    def __call__(self, x, mask):
        c = self.config
        dense = functools.partial(nn.Dense, c.hidden_size, dtype=self.dtype)
        q, k, v = (_split_heads(dense(name=n)(x), c.num_attention_heads) for n in ("q_proj", "k_proj", "v_proj"))
        out = dot_product_attention(q, k, v, mask=mask, implementation=self.attention)
        return dense(name="out_proj")(out.reshape(x.shape))


class CLIPMLP(_CLIPModule):
    @nn.compact
    def __call__(self, x):
        c = self.config
        x = nn.Dense(c.intermediate_size, dtype=self.dtype, name="fc1")(x)
        x = _CLIP_ACTIVATIONS[c.hidden_act](x)
        return nn.Dense(c.hidden_size, dtype=self.dtype, name="fc2")(x)


def _layer_norm(eps: float, dtype: Any, name: str) -> nn.LayerNorm:
    # Two-pass variance (as torch) in fp32.
    return nn.LayerNorm(epsilon=eps, dtype=dtype, use_fast_variance=False, name=name)


class CLIPEncoderLayer(_CLIPModule):
    """Pre-LN block. Scan carry = (this layer's output, its input) so that the input of the last layer,
    transformers' `hidden_states[-2]`, falls out of the scan without keeping every layer's states."""

    @nn.compact
    def __call__(self, carry, mask):
        c = self.config
        x, _ = carry
        h = x + CLIPAttention(c, self.dtype, self.attention, name="self_attn")(
            _layer_norm(c.layer_norm_eps, self.dtype, "layer_norm1")(x), mask)
        h = h + CLIPMLP(c, self.dtype, name="mlp")(_layer_norm(c.layer_norm_eps, self.dtype, "layer_norm2")(h))
        return (h, x), None


class CLIPEncoder(_CLIPModule):
    @nn.compact
    def __call__(self, x, mask):
        layers = nn.scan(CLIPEncoderLayer, variable_axes={"params": 0}, split_rngs={"params": True},
                         in_axes=nn.broadcast, length=self.config.num_hidden_layers)
        (last, penultimate), _ = layers(self.config, self.dtype, self.attention, name="layers")((x, x), mask)
        return last, penultimate


class CLIPTextEmbeddings(_CLIPModule):
    @nn.compact
    def __call__(self, input_ids):
        c = self.config
        tokens = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype, name="token_embedding")(input_ids)
        positions = nn.Embed(c.max_position_embeddings, c.hidden_size, dtype=self.dtype,
                             name="position_embedding")(jnp.arange(input_ids.shape[-1]))
        return tokens + positions


class CLIPTextTransformer(_CLIPModule):
    @nn.compact
    def __call__(self, input_ids):
        c = self.config
        if input_ids.shape[-1] > c.max_position_embeddings:
            raise ValueError(f"{input_ids.shape[-1]} tokens exceed max_position_embeddings {c.max_position_embeddings}")
        x = CLIPTextEmbeddings(c, self.dtype, name="embeddings")(input_ids)
        causal = jnp.tril(jnp.ones((x.shape[1], x.shape[1]), bool))[None, None]
        last, penultimate = CLIPEncoder(c, self.dtype, self.attention, name="encoder")(x, causal)
        last = _layer_norm(c.layer_norm_eps, self.dtype, "final_layer_norm")(last)
        if c.eos_token_id == 2:
            # transformers' rule for configs saved before its PR #24773: the highest id is the EOS.
            eos_position = jnp.argmax(input_ids, axis=-1)
        else:
            eos_position = jnp.argmax(input_ids == c.eos_token_id, axis=-1)  # first occurrence
        pooled = jnp.take_along_axis(last, eos_position[:, None, None], axis=1)[:, 0]
        return penultimate, pooled


class CLIPTextEncoder(_CLIPModule):
    """transformers `CLIPTextModelWithProjection`.

    input_ids (B, T) int -> (hidden_states[-2] (B, T, hidden): the penultimate layer output without the final
    LN, pooled (B, projection_dim): the final-LN state at the EOS position times `text_projection` (no bias)).
    """

    @nn.compact
    def __call__(self, input_ids):
        penultimate, pooled = CLIPTextTransformer(self.config, self.dtype, self.attention, name="text_model")(input_ids)
        pooled = nn.Dense(self.config.projection_dim, use_bias=False, dtype=self.dtype, name="text_projection")(pooled)
        return penultimate, pooled


# ---------------------------------------------------------------------------------------------- T5


def relative_position_buckets(query_length: int, key_length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """Bidirectional T5 buckets (query_length, key_length), int32, computed on the host for static lengths.

    Same float32 operations as transformers' `T5Attention._relative_position_bucket` so that the log-spaced
    bucket edges round the same way.
    """
    relative = np.arange(key_length)[None, :] - np.arange(query_length)[:, None]
    num_buckets //= 2
    buckets = (relative > 0).astype(np.int64) * num_buckets
    distance = np.abs(relative)
    max_exact = num_buckets // 2
    with np.errstate(divide="ignore"):  # log(0) for the exact (small-distance) positions, not selected below
        large = (np.log(distance.astype(np.float32) / np.float32(max_exact))
                 / np.float32(np.log(max_distance / max_exact)) * np.float32(num_buckets - max_exact))
    large = max_exact + np.where(distance < max_exact, 0, large).astype(np.int64)
    large = np.minimum(large, num_buckets - 1)
    return (buckets + np.where(distance < max_exact, distance, large)).astype(np.int32)


class T5LayerNorm(nn.Module):
    """RMSNorm without mean subtraction or bias; the variance in fp32."""
    epsilon: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        variance = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        return scale.astype(self.dtype) * (x32 * jax.lax.rsqrt(variance + self.epsilon)).astype(self.dtype)


class _T5Module(nn.Module):
    """The fields of every T5 module but the norm; `attention` as in `_CLIPModule`."""
    config: T5Config
    dtype: Any = jnp.float32
    attention: str | None = None


class T5Attention(_T5Module):
    @nn.compact
    def __call__(self, x, position_bias, mask):
        c = self.config
        dense = functools.partial(nn.Dense, c.num_heads * c.d_kv, use_bias=False, dtype=self.dtype)
        q, k, v = (_split_heads(dense(name=n)(x), c.num_heads) for n in ("q", "k", "v"))
        # T5 folds the scale into its weights: no 1/sqrt(d) on the logits.
        out = dot_product_attention(q, k, v, bias=position_bias.astype(q.dtype), mask=mask, scale=1.0,
                                    implementation=self.attention)
        out = out.reshape(x.shape[:-1] + (c.num_heads * c.d_kv,))
        return nn.Dense(c.d_model, use_bias=False, dtype=self.dtype, name="o")(out)


class T5LayerSelfAttention(_T5Module):
    @nn.compact
    def __call__(self, x, position_bias, mask):
        normed = T5LayerNorm(self.config.layer_norm_epsilon, self.dtype, name="layer_norm")(x)
        return x + T5Attention(self.config, self.dtype, self.attention, name="SelfAttention")(normed, position_bias,
                                                                                              mask)


class T5DenseGatedActDense(_T5Module):
    @nn.compact
    def __call__(self, x):
        c = self.config
        dense = functools.partial(nn.Dense, use_bias=False, dtype=self.dtype)
        gate = jax.nn.gelu(dense(c.d_ff, name="wi_0")(x), approximate=True)  # transformers 'gelu_new'
        return dense(c.d_model, name="wo")(gate * dense(c.d_ff, name="wi_1")(x))


class T5LayerFF(_T5Module):
    @nn.compact
    def __call__(self, x):
        normed = T5LayerNorm(self.config.layer_norm_epsilon, self.dtype, name="layer_norm")(x)
        return x + T5DenseGatedActDense(self.config, self.dtype, name="DenseReluDense")(normed)


class T5Block(_T5Module):
    """torch `block.{i}.layer.0` -> `layer_0` (self-attention), `layer.1` -> `layer_1` (feed-forward)."""

    @nn.compact
    def __call__(self, x, position_bias, mask):
        x = T5LayerSelfAttention(self.config, self.dtype, self.attention, name="layer_0")(x, position_bias, mask)
        return T5LayerFF(self.config, self.dtype, name="layer_1")(x), None


class T5Stack(_T5Module):
    @nn.compact
    def __call__(self, x, mask):
        c = self.config
        # torch keeps the bias table in block 0 and shares the computed bias with every block.
        buckets = relative_position_buckets(x.shape[1], x.shape[1], c.relative_attention_num_buckets,
                                            c.relative_attention_max_distance)
        table = nn.Embed(c.relative_attention_num_buckets, c.num_heads, name="relative_attention_bias")
        position_bias = jnp.transpose(table(jnp.asarray(buckets)), (2, 0, 1))[None]  # (1, heads, T, T)
        blocks = nn.scan(T5Block, variable_axes={"params": 0}, split_rngs={"params": True},
                         in_axes=(nn.broadcast, nn.broadcast), length=c.num_layers)
        x, _ = blocks(c, self.dtype, self.attention, name="block")(x, position_bias, mask)
        return T5LayerNorm(c.layer_norm_epsilon, self.dtype, name="final_layer_norm")(x)


class T5Encoder(_T5Module):
    """transformers `T5EncoderModel`: input_ids (B, T) -> last_hidden_state (B, T, d_model).

    `attention_mask` (B, T), 1 = keep, is optional: SD3 passes none, so padding tokens are attended to.
    """

    @nn.compact
    def __call__(self, input_ids, attention_mask=None):
        c = self.config
        x = nn.Embed(c.vocab_size, c.d_model, dtype=self.dtype, name="shared")(input_ids)
        mask = None if attention_mask is None else attention_mask.astype(bool)[:, None, None, :]
        return T5Stack(c, self.dtype, self.attention, name="encoder")(x, mask)


# ---------------------------------------------------------------------------------------------- SD3 assembly


@dataclasses.dataclass
class TextEncoders:
    """The three SD3 text encoders with their params and tokenizers (transformers `CLIPTokenizer` for
    `tokenizer`/`tokenizer_2`, `T5TokenizerFast` for `tokenizer_3`)."""
    clip_l: CLIPTextConfig
    clip_g: CLIPTextConfig
    t5: T5Config
    clip_l_params: Any
    clip_g_params: Any
    t5_params: Any
    tokenizer: Any
    tokenizer_2: Any
    tokenizer_3: Any
    dtype: Any = jnp.float32
    attention: str | None = None

    @property
    def joint_dim(self) -> int:
        return self.t5.d_model

    @property
    def pooled_dim(self) -> int:
        return self.clip_l.projection_dim + self.clip_g.projection_dim


def load_tokenizers(root: str):
    """(CLIP-L, CLIP-G, T5) tokenizers from the SD3.5 diffusers subfolders tokenizer, tokenizer_2, tokenizer_3;
    in a bucket they are staged (transformers reads local files only)."""
    from transformers import CLIPTokenizer, T5TokenizerFast
    paths = [os.path.join(root, name) for name in TOKENIZER_DIRS]
    missing = [p for p in paths if not files.is_dir(p)]
    if missing:
        raise FileNotFoundError(f"{root}: missing tokenizer folder(s) {missing} (SD3.5 diffusers layout)")
    paths = [files.stage(p, what="transformers' tokenizers") for p in paths]
    return (CLIPTokenizer.from_pretrained(paths[0]), CLIPTokenizer.from_pretrained(paths[1]),
            T5TokenizerFast.from_pretrained(paths[2]))


@functools.lru_cache(maxsize=None)
def jitted_apply(module: nn.Module):
    """One jitted `module.apply` per module configuration (modules compare by their fields)."""
    return jax.jit(module.apply)


def _token_ids(tokenizer, prompts: list[str], length: int) -> jnp.ndarray:
    ids = tokenizer(list(prompts), padding="max_length", max_length=length, truncation=True,
                    add_special_tokens=True, return_tensors="np").input_ids
    return jnp.asarray(ids, jnp.int32)


def encode_prompts(encoders: TextEncoders, prompts: list[str], t5_max_length: int = 77):
    """SD3 conditioning: (prompt_embeds (B, 77 + t5_max_length, d_model), pooled (B, 2048 for SD3)).

    prompt_embeds = [zero-pad_to_d_model(concat_features(CLIP-L, CLIP-G penultimate states)) ; T5 states]
    along the sequence; pooled = concat(CLIP-L pooled, CLIP-G pooled).
    """
    e = encoders
    clip_l = jitted_apply(CLIPTextEncoder(e.clip_l, e.dtype, e.attention))
    clip_g = jitted_apply(CLIPTextEncoder(e.clip_g, e.dtype, e.attention))
    t5 = jitted_apply(T5Encoder(e.t5, e.dtype, e.attention))
    hidden_l, pooled_l = clip_l({"params": e.clip_l_params}, _token_ids(e.tokenizer, prompts, CLIP_MAX_LENGTH))
    hidden_g, pooled_g = clip_g({"params": e.clip_g_params}, _token_ids(e.tokenizer_2, prompts, CLIP_MAX_LENGTH))
    t5_embeds = t5({"params": e.t5_params}, _token_ids(e.tokenizer_3, prompts, t5_max_length))
    clip_embeds = jnp.concatenate([hidden_l, hidden_g], axis=-1)
    width = t5_embeds.shape[-1] - clip_embeds.shape[-1]
    if width < 0:
        raise ValueError(f"CLIP widths {hidden_l.shape[-1]} + {hidden_g.shape[-1]} exceed the T5 width "
                         f"{t5_embeds.shape[-1]}")
    clip_embeds = jnp.pad(clip_embeds, ((0, 0), (0, 0), (0, width)))
    return jnp.concatenate([clip_embeds, t5_embeds], axis=-2), jnp.concatenate([pooled_l, pooled_g], axis=-1)


def null_prompt_embeddings(encoders: TextEncoders, t5_max_length: int = 77):
    """The "NULL" conditioning (text dropout, CFG unconditional): encode("") -> ((77 + n, d_model), (2048,))."""
    prompt_embeds, pooled = encode_prompts(encoders, [""], t5_max_length)
    return prompt_embeds[0], pooled[0]


def postprocess_caption(text: str) -> str:
    """SMFSR test-time caption rule: drop every sentence (split after . ? !) that contains a banned word
    (case-insensitive substring), strip, then append a space and the fixed quality suffix."""
    parts = re.split(r"([.?!])", text)
    sentences = ["".join(parts[i:i + 2]) for i in range(0, len(parts), 2)]
    kept = [s for s in sentences if not any(word in s.lower() for word in CAPTION_BANNED_WORDS)]
    return "".join(kept).strip() + " " + CAPTION_SUFFIX
