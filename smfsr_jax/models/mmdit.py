"""SD3.5 MM-DiT with DiT4SR's LR-latent stream and SMFSR's interval (r, t) time embedding.

One class covers the three networks of the project:
- `sd35_medium`: the plain SD3.5-Medium transformer (diffusers `SD3Transformer2DModel`);
- `dit4sr_teacher`: + the LR stream (control projections, `to_out_control`, depthwise `control_conv`);
- `smfsr_student`: + the interval embedding e_{r,t} = MLP([E(r, p) ; E(t, p)]).

Latents are NHWC. Times are flow times in [0, 1] (t = 1 is noise); `time_scale` maps them to what the
checkpoint's timestep embedder expects (1000 for SD3.5/DiT4SR/teacher weights, 1 for SMFSR students).

Parameter paths mirror the diffusers names (`to_out.0` -> `to_out`, `ff.net.0.proj`/`ff.net.2` ->
`ff/fc1`/`ff/fc2`, Sequential indices -> `linear_1`/`linear_2`). Blocks 0..L-2 are stacked for `nn.scan`
per maximal run of consecutive blocks of one kind (MMDiT-X blocks with `attn2`, or plain): the n-th run of
a kind is `dual_blocks` / `blocks` for n = 0 and `dual_blocks_n` / `blocks_n` after (`MMDiTConfig.block_runs`);
the context-pre-only last block is `last_block`, unrolled. A prefix `dual_attention_layers` (SD3.5) thus
gives `dual_blocks`, `blocks`, `last_block`.
"""

import dataclasses
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from smfsr_jax.models import attention

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_qkv_attn": jax.checkpoint_policies.save_only_these_names("qkv", "attn_out"),
    "save_attn_mlp": jax.checkpoint_policies.save_only_these_names("qkv", "attn_out", "mlp_hidden"),
}


@dataclasses.dataclass(frozen=True)
class MMDiTConfig:
    patch_size: int = 2
    in_channels: int = 16
    out_channels: int = 16
    num_layers: int = 24
    num_heads: int = 24
    head_dim: int = 64
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 2048
    pos_embed_max_size: int = 384
    sample_size: int = 128  # only sets the base grid (sample_size / patch_size) of the sin-cos table init
    dual_attention_layers: tuple = tuple(range(13))
    qk_norm: Optional[str] = "rms_norm"  # "rms_norm" or None (SD3.0)
    lr_stream: bool = False
    lr_key_bug: bool = True  # double-normalised LR keys of dit4sr_q/f, Teacher, SMFSR (False: dit4sr_r1)
    lr_conv_scale: float = 1.2
    time_conditioning: str = "single"  # "single" (teacher) | "interval" (SMFSR student)
    time_scale: float = 1000.0
    dtype: str = "float32"  # compute dtype; params stay fp32
    attention: Optional[str] = None  # None (splash on a TPU, else XLA) | "xla" | "cudnn" | "splash"
    remat_policy: str = "none"

    def __post_init__(self):
        object.__setattr__(self, "dual_attention_layers", tuple(sorted({int(i) for i in self.dual_attention_layers})))
        if self.time_conditioning not in ("single", "interval"):
            raise ValueError(f"time_conditioning must be 'single' or 'interval', got {self.time_conditioning!r}")
        if self.qk_norm not in ("rms_norm", None):
            raise ValueError(f"qk_norm must be 'rms_norm' or None, got {self.qk_norm!r}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy must be one of {sorted(REMAT_POLICIES)}, got {self.remat_policy!r}")
        outside = [i for i in self.dual_attention_layers if not 0 <= i < self.num_layers]
        if outside:
            raise ValueError(f"dual_attention_layers {outside} are not blocks of a {self.num_layers}-block network")

    @property
    def hidden_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def block_runs(self) -> tuple:
        """(scan group name, first block, length, dual) per maximal run of like blocks among 0..L-2."""
        runs, seen = [], {True: 0, False: 0}
        for i in range(self.num_layers - 1):
            dual = i in self.dual_attention_layers
            if runs and runs[-1][3] == dual:
                name, start, length, _ = runs[-1]
                runs[-1] = (name, start, length + 1, dual)
                continue
            base = "dual_blocks" if dual else "blocks"
            runs.append((f"{base}_{seen[dual]}" if seen[dual] else base, i, 1, dual))
            seen[dual] += 1
        return tuple(runs)

    @property
    def last_block_dual(self) -> bool:
        return self.num_layers - 1 in self.dual_attention_layers

    def replace(self, **kw) -> "MMDiTConfig":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["dual_attention_layers"] = list(self.dual_attention_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "MMDiTConfig":
        return cls(**d)

    # Presets: SD3.5-Medium (24 blocks, 0..12 dual), + the DiT4SR LR stream, + the SMFSR interval embedding.
    @classmethod
    def sd35_medium(cls, **kw) -> "MMDiTConfig":
        return cls(**kw)

    @classmethod
    def dit4sr_teacher(cls, **kw) -> "MMDiTConfig":
        return cls(**{"lr_stream": True, **kw})

    @classmethod
    def smfsr_student(cls, **kw) -> "MMDiTConfig":
        return cls(**{"lr_stream": True, "time_conditioning": "interval", "time_scale": 1.0, **kw})

    @classmethod
    def tiny(cls, **kw) -> "MMDiTConfig":
        """The parity-fixture geometry: 3 blocks (2 dual), width 16, 2 heads."""
        base = dict(num_layers=3, num_heads=2, head_dim=8, joint_attention_dim=32, pooled_projection_dim=24,
                    pos_embed_max_size=16, sample_size=8, dual_attention_layers=(0, 1))
        return cls(**{**base, **kw})

    @classmethod
    def tiny_teacher(cls, **kw) -> "MMDiTConfig":
        return cls.tiny(**{"lr_stream": True, **kw})

    @classmethod
    def tiny_student(cls, **kw) -> "MMDiTConfig":
        return cls.tiny(**{"lr_stream": True, "time_conditioning": "interval", "time_scale": 1.0, **kw})


PRESETS = {
    "sd35_medium": MMDiTConfig.sd35_medium,
    "dit4sr_teacher": MMDiTConfig.dit4sr_teacher,
    "smfsr_student": MMDiTConfig.smfsr_student,
    "tiny": MMDiTConfig.tiny,
    "tiny_teacher": MMDiTConfig.tiny_teacher,
    "tiny_student": MMDiTConfig.tiny_student,
}


# ---------------------------------------------------------------------------------------------
# Fixed functions.

def sincos_pos_embed_table(embed_dim: int, grid_size: int, base_size: int) -> np.ndarray:
    """diffusers `get_2d_sincos_pos_embed` (the formula behind the stored `pos_embed` buffer), (1, M*M, D)."""
    coords = np.arange(grid_size, dtype=np.float64) / (grid_size / base_size)
    grid_w, grid_h = np.meshgrid(coords, coords)  # "xy": first half of the channels from the column

    def one_axis(pos):
        omega = 1.0 / 10000 ** (np.arange(embed_dim // 4, dtype=np.float64) / (embed_dim / 4.0))
        out = pos.reshape(-1)[:, None] * omega[None]
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    table = np.concatenate([one_axis(grid_w), one_axis(grid_h)], axis=1)
    return table[None].astype(np.float32)


def _timestep_frequencies(half: int = 128) -> np.ndarray:
    # torch computes the exponent in float32 and exp() of it; we round exp correctly from float64.
    exponent = np.float32(-math.log(10000)) * np.arange(half, dtype=np.float32)
    exponent = exponent / np.float32(half)
    return np.exp(exponent.astype(np.float64)).astype(np.float32)


def timestep_sinusoid(timesteps: jax.Array, dim: int = 256) -> jax.Array:
    """SD3 `Timesteps(256, flip_sin_to_cos=True, shift 0)`: [cos, sin], always computed in fp32."""
    freqs = jnp.asarray(_timestep_frequencies(dim // 2))
    args = timesteps.astype(jnp.float32)[:, None] * freqs[None]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def layer_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """LayerNorm without affine parameters; statistics in fp32."""
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    var = jnp.square(xf - mean).mean(-1, keepdims=True)
    return ((xf - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    return x * (1 + scale[:, None]) + shift[:, None]


# ---------------------------------------------------------------------------------------------
# Modules.

class RMSNorm(nn.Module):
    """Per-head q/k RMSNorm (eps 1e-6) with a learnable scale; the mean square is taken in fp32."""
    eps: float = 1e-6

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        ms = jnp.square(x.astype(jnp.float32)).mean(-1, keepdims=True)
        return (x.astype(jnp.float32) * jax.lax.rsqrt(ms + self.eps) * scale).astype(x.dtype)


class Modulation(nn.Module):
    """The adaLN projection Linear(SiLU(temb)), split into `chunks` vectors (diffusers `norm*.linear`).

    Zero-initialised (DiT's adaLN-Zero) so that a network trained from scratch starts as the identity
    on its residual stream; converted weights replace it.
    """
    chunks: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, temb):
        d = temb.shape[-1]
        out = nn.Dense(self.chunks * d, dtype=self.dtype, kernel_init=nn.initializers.zeros,
                       name="linear")(nn.silu(temb))
        return jnp.split(out, self.chunks, axis=-1)


class TimestepTextEmbedding(nn.Module):
    """SD3 `CombinedTimestepTextProjEmbeddings`: MLP(sinusoid(tau)) + MLP(pooled text)."""
    hidden_size: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tau, pooled):
        t_emb = TwoLayerMLP(self.hidden_size, self.dtype, name="timestep_embedder")(
            timestep_sinusoid(tau).astype(self.dtype))
        p_emb = TwoLayerMLP(self.hidden_size, self.dtype, name="text_embedder")(pooled.astype(self.dtype))
        return t_emb + p_emb


class TwoLayerMLP(nn.Module):
    """Linear -> SiLU -> Linear, named `linear_1`/`linear_2` as diffusers' embedders."""
    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(self.features, dtype=self.dtype, name="linear_1")(x)
        return nn.Dense(self.features, dtype=self.dtype, name="linear_2")(nn.silu(h))


class IntervalTimeEmbedding(nn.Module):
    """SMFSR `time_text_embed_interval`: MLP([E(r, p) ; E(t, p)]) with one shared E."""
    hidden_size: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tau_r, tau_t, pooled):
        embed = TimestepTextEmbedding(self.hidden_size, self.dtype, name="time_text_embed")
        both = jnp.concatenate([embed(tau_r, pooled), embed(tau_t, pooled)], axis=-1)
        return TwoLayerMLP(self.hidden_size, self.dtype, name="interval_embedder")(both)


class PatchEmbed(nn.Module):
    """Patch conv (k = s = patch) + the centre-cropped stored positional table."""
    config: MMDiTConfig

    @nn.compact
    def __call__(self, latents):
        cfg = self.config
        p, m, d = cfg.patch_size, cfg.pos_embed_max_size, cfg.hidden_size
        # A host callback, not a constant: abstract inits (eval_shape) then skip the table (16 s at full
        # size) and jitted inits do not embed it in the program.
        table = self.param("pos_embed", lambda *_: jax.pure_callback(
            lambda: sincos_pos_embed_table(d, m, cfg.sample_size // p),
            jax.ShapeDtypeStruct((1, m * m, d), jnp.float32)))
        conv = nn.Conv(d, (p, p), strides=(p, p), padding="VALID", dtype=cfg.compute_dtype, name="proj")
        x = conv(latents.astype(cfg.compute_dtype))
        b, h, w, _ = x.shape
        if h > m or w > m:
            raise ValueError(f"a {h}x{w} token grid exceeds the {m}x{m} positional table")
        top, left = (m - h) // 2, (m - w) // 2
        pos = table.reshape(m, m, d)[top:top + h, left:left + w].reshape(1, h * w, d)
        return (x.reshape(b, h * w, d).astype(jnp.float32) + pos).astype(cfg.compute_dtype)


class JointAttention(nn.Module):
    """Attention over [image | LR | context] tokens (`attn`), or [image | LR] (`attn2`, no context).

    The LR half gets the frozen projections followed by the control projections, shares
    the image q/k RMSNorm and is output through `to_out_control(o_lr + h_lr)`, as in the DiT4SR release.
    """
    config: MMDiTConfig
    with_context: bool
    context_pre_only: bool = False

    def dense(self, name):
        return nn.Dense(self.config.hidden_size, dtype=self.config.compute_dtype, name=name)

    def heads(self, x):
        return x.reshape(*x.shape[:2], self.config.num_heads, self.config.head_dim)

    def qk_norm(self, name):
        return RMSNorm(name=name) if self.config.qk_norm else (lambda x: x)

    @nn.compact
    def __call__(self, h, context=None):
        cfg = self.config
        norm_q, norm_k = self.qk_norm("norm_q"), self.qk_norm("norm_k")
        to_q, to_k, to_v = self.dense("to_q"), self.dense("to_k"), self.dense("to_v")
        if cfg.lr_stream:
            h, h_lr = jnp.split(h, 2, axis=1)
        n_img = h.shape[1]

        q = norm_q(self.heads(to_q(h)))
        k = norm_k(self.heads(to_k(h)))
        v = self.heads(to_v(h))
        qs, ks, vs = [q], [k], [v]
        if cfg.lr_stream:
            q_lr = norm_q(self.heads(self.dense("to_q_control")(to_q(h_lr))))
            # The released weights were trained with the LR keys taken from the normalised image keys, normalised
            # again: `to_k_control` then holds weights that no output reads, made at init and never traced after.
            key_bug = cfg.qk_norm and cfg.lr_key_bug
            if key_bug:
                k_lr = norm_k(k)
                if self.is_initializing():
                    self.dense("to_k_control")(to_k(h_lr))
            else:
                k_lr = norm_k(self.heads(self.dense("to_k_control")(to_k(h_lr))))
            v_lr = self.heads(self.dense("to_v_control")(to_v(h_lr)))
            qs, ks, vs = qs + [q_lr], ks + [k_lr], vs + [v_lr]
        if self.with_context:
            qs.append(self.qk_norm("norm_added_q")(self.heads(self.dense("add_q_proj")(context))))
            ks.append(self.qk_norm("norm_added_k")(self.heads(self.dense("add_k_proj")(context))))
            vs.append(self.heads(self.dense("add_v_proj")(context)))
        q, k, v = (checkpoint_name(jnp.concatenate(t, axis=1), "qkv") for t in (qs, ks, vs))

        o = attention.dot_product_attention(q, k, v, implementation=attention.with_platform_default(cfg.attention))
        o = checkpoint_name(o.reshape(*o.shape[:2], cfg.hidden_size), "attn_out")

        out = self.dense("to_out")(o[:, :n_img])
        if cfg.lr_stream:
            o_lr = o[:, n_img:2 * n_img]
            out = jnp.concatenate([out, self.dense("to_out_control")(o_lr + h_lr)], axis=1)
        out_ctx = None
        if self.with_context and not self.context_pre_only:
            out_ctx = self.dense("to_add_out")(o[:, o.shape[1] - context.shape[1]:])
        return out, out_ctx


class DepthwiseConv3x3(nn.Module):
    """Depthwise 3x3 conv (zero padding 1, bias) as nine shifted multiply-adds.

    Same parameters as `nn.Conv(C, (3, 3), feature_group_count=C)`; written out because XLA's grouped
    convolution gradient inside `scan` is two orders of magnitude slower on CPU, and the shifted sum
    fuses into one elementwise kernel everywhere.
    """
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (3, 3, 1, c), jnp.float32).astype(self.dtype)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32).astype(self.dtype)
        h, w = x.shape[1:3]
        padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        out = sum(padded[:, i:i + h, j:j + w] * kernel[i, j, 0] for i in range(3) for j in range(3))
        return out + bias


class FeedForward(nn.Module):
    """GELU-tanh MLP; with the LR stream, the depthwise `control_conv` of the LR half feeds the image half."""
    config: MMDiTConfig
    grid: Optional[tuple] = None  # (h, w) token grid; needed by the LR control conv
    lr_stream: bool = False

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        d = x.shape[-1]
        hidden = nn.gelu(nn.Dense(4 * d, dtype=cfg.compute_dtype, name="fc1")(x), approximate=True)
        if self.lr_stream:
            h_img, h_lr = jnp.split(hidden, 2, axis=1)
            b, (gh, gw) = x.shape[0], self.grid
            conv = DepthwiseConv3x3(cfg.compute_dtype, name="control_conv")
            control = conv(h_lr.reshape(b, gh, gw, 4 * d)).reshape(b, gh * gw, 4 * d)
            hidden = jnp.concatenate([h_img + cfg.lr_conv_scale * control, h_lr], axis=1)
        hidden = checkpoint_name(hidden, "mlp_hidden")
        return nn.Dense(d, dtype=cfg.compute_dtype, name="fc2")(hidden)


class JointBlock(nn.Module):
    """One MM-DiT block (diffusers `JointTransformerBlock`, DiT4SR variant when `lr_stream`)."""
    config: MMDiTConfig
    grid: tuple
    dual: bool
    context_pre_only: bool = False

    @nn.compact
    def __call__(self, carry, temb):
        cfg = self.config
        x, ctx = carry
        mods = Modulation(9 if self.dual else 6, cfg.compute_dtype, name="norm1")(temb)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods[:6]
        if self.context_pre_only:
            c_scale, c_shift = Modulation(2, cfg.compute_dtype, name="norm1_context")(temb)
            norm_ctx = modulate(layer_norm(ctx), c_shift, c_scale)
        else:
            c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = Modulation(
                6, cfg.compute_dtype, name="norm1_context")(temb)
            norm_ctx = modulate(layer_norm(ctx), c_shift_msa, c_scale_msa)

        ln_x = layer_norm(x)
        attn_out, ctx_out = JointAttention(cfg, with_context=True, context_pre_only=self.context_pre_only,
                                           name="attn")(modulate(ln_x, shift_msa, scale_msa), norm_ctx)
        # The second (image-only) attention reads the block input's LN, not the updated x.
        norm_x2 = modulate(ln_x, mods[6], mods[7]) if self.dual else None
        x = x + gate_msa[:, None] * attn_out
        if self.dual:
            attn2_out, _ = JointAttention(cfg, with_context=False, name="attn2")(norm_x2)
            x = x + mods[8][:, None] * attn2_out
        ff = FeedForward(cfg, self.grid, cfg.lr_stream, name="ff")
        x = x + gate_mlp[:, None] * ff(modulate(layer_norm(x), shift_mlp, scale_mlp))

        if self.context_pre_only:
            return (x, None), None
        ctx = ctx + c_gate_msa[:, None] * ctx_out
        ff_ctx = FeedForward(cfg, name="ff_context")
        ctx = ctx + c_gate_mlp[:, None] * ff_ctx(modulate(layer_norm(ctx), c_shift_mlp, c_scale_mlp))
        return (x, ctx), None


class MMDiT(nn.Module):
    """`apply({'params': p}, latents, context=, pooled=, t=, r=None, lr_latents=None)` -> velocity (NHWC).

    latents, lr_latents: (B, H, W, in_channels); context: (B, L, joint_attention_dim); pooled: (B, P);
    t, r: (B,) flow times in [0, 1]. Returns v (single) or the average velocity u(z_t, r, t) (interval),
    fp32, shaped like `latents`.
    """
    config: MMDiTConfig

    @nn.compact
    def __call__(self, latents, *, context, pooled, t, r=None, lr_latents=None):
        cfg = self.config
        dtype = cfg.compute_dtype
        b, height, width, _ = latents.shape
        p = cfg.patch_size
        if height % p or width % p:
            raise ValueError(f"latent size {height}x{width} is not a multiple of the patch size {p}")
        grid = (height // p, width // p)
        if cfg.lr_stream != (lr_latents is not None):
            raise ValueError("lr_latents must be given exactly when the config has lr_stream=True")
        if (cfg.time_conditioning == "interval") != (r is not None):
            raise ValueError("r must be given exactly when time_conditioning='interval'")

        patch_embed = PatchEmbed(cfg, name="pos_embed")
        x = patch_embed(latents)
        if cfg.lr_stream:
            x = jnp.concatenate([x, patch_embed(lr_latents)], axis=1)

        # The time embedding runs in fp32 at any compute dtype: in bf16, 1000 t and the small differences
        # between nearby embeddings (which a fitted interval MLP has to resolve) lose their low bits.
        tau_t = jnp.asarray(t, jnp.float32).reshape(b) * cfg.time_scale
        if cfg.time_conditioning == "interval":
            tau_r = jnp.asarray(r, jnp.float32).reshape(b) * cfg.time_scale
            temb = IntervalTimeEmbedding(cfg.hidden_size, jnp.float32, name="time_text_embed_interval")(
                tau_r, tau_t, pooled)
        else:
            temb = TimestepTextEmbedding(cfg.hidden_size, jnp.float32, name="time_text_embed")(tau_t, pooled)
        ctx = nn.Dense(cfg.hidden_size, dtype=dtype, name="context_embedder")(context.astype(dtype))

        carry = (x, ctx)
        for name, _, length, dual in cfg.block_runs:
            carry, _ = self.block_stack(length)(cfg, grid, dual, name=name)(carry, temb)
        (x, _), _ = self.block_class(scanned=False)(cfg, grid, cfg.last_block_dual, context_pre_only=True,
                                       name="last_block")(carry, temb)

        x = x[:, :grid[0] * grid[1]]
        scale, shift = Modulation(2, dtype, name="norm_out")(temb)
        x = modulate(layer_norm(x), shift, scale)
        x = nn.Dense(p * p * cfg.out_channels, dtype=dtype, kernel_init=nn.initializers.zeros, name="proj_out")(x)
        # Token (y, x) channel (pi*p + qi)*C + c -> latent pixel (p*y + pi, p*x + qi, c).
        x = x.reshape(b, grid[0], grid[1], p, p, cfg.out_channels)
        x = x.transpose(0, 1, 3, 2, 4, 5).reshape(b, grid[0] * p, grid[1] * p, cfg.out_channels)
        return x.astype(jnp.float32)

    def block_class(self, scanned: bool):
        if self.config.remat_policy == "none":
            return JointBlock
        # CSE prevention is only needed outside scan (scan already keeps the recomputation).
        return nn.remat(JointBlock, policy=REMAT_POLICIES[self.config.remat_policy], prevent_cse=not scanned)

    def block_stack(self, length: int):
        return nn.scan(self.block_class(scanned=True), variable_axes={"params": 0}, split_rngs={"params": True},
                       in_axes=nn.broadcast, length=length)


def average_velocity(model: MMDiT, params, *, context, pooled, lr_latents=None):
    """u(z, r, t) of an interval-conditioned network for fixed conditioning: the argument order of every objective
    and of `core.flow.one_step` (the samplers' order, (z, lr, cond, t, r), is samplers.student_velocity's)."""
    return lambda z, r, t: model.apply({"params": params}, z, context=context, pooled=pooled, r=r, t=t,
                                       lr_latents=lr_latents)


def velocity(model: MMDiT, params, *, context, pooled, lr_latents=None):
    """v(z, t) of a single-time network (a teacher) for fixed conditioning, the objectives' argument order."""
    return lambda z, t: model.apply({"params": params}, z, context=context, pooled=pooled, t=t, lr_latents=lr_latents)


def init_params(config: MMDiTConfig, rng, latent_size: tuple = (8, 8), context_len: int = 4, batch: int = 1):
    """Params for training from scratch: flax default inits, adaLN modulations and proj_out at zero.

    The LR stream starts random here, not at zero: zero control weights (DiT4SR's init, made by the
    `teacher_fm` stage's `teacher_from_base`) only make sense on top of a pretrained base."""
    args, kwargs = dummy_inputs(config, latent_size, context_len, batch)
    return MMDiT(config).init(rng, *args, **kwargs)["params"]


def dummy_inputs(config: MMDiTConfig, latent_size: tuple = (8, 8), context_len: int = 4, batch: int = 1):
    """Zero inputs for init and eval_shape, as (args, kwargs)."""
    h, w = latent_size
    latents = jnp.zeros((batch, h, w, config.in_channels), jnp.float32)
    return (latents,), dict(
        context=jnp.zeros((batch, context_len, config.joint_attention_dim), jnp.float32),
        pooled=jnp.zeros((batch, config.pooled_projection_dim), jnp.float32),
        t=jnp.ones((batch,), jnp.float32),
        r=jnp.zeros((batch,), jnp.float32) if config.time_conditioning == "interval" else None,
        lr_latents=latents if config.lr_stream else None)


def abstract_params(config: MMDiTConfig):
    """Parameter shapes without allocating memory (jax.eval_shape)."""
    args, kwargs = dummy_inputs(config)
    return jax.eval_shape(lambda rng: MMDiT(config).init(rng, *args, **kwargs)["params"],
                          jax.random.PRNGKey(0))
