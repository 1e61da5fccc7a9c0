"""A functional torch reference of the DiT4SR / SMFSR transformer, over a diffusers-named state dict.

Written independently of the JAX model in torch (NCHW, unfused, diffusers key names; any set of dual
attention blocks) so that random configurations beyond the shared fixtures can be checked. The shared
fixtures (made by the official DiT4SR / SMFSR code) validate this reference itself (tests/test_mmdit.py).
"""

import math

import torch
import torch.nn.functional as F


def _linear(sd, key, x):
    return F.linear(x, sd[f"{key}.weight"], sd[f"{key}.bias"])


def _rms(sd, key, x):
    var = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
    return x * torch.rsqrt(var + 1e-6) * sd[f"{key}.weight"]


def _ln(x):
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


def _sinusoid(timesteps):
    exponent = -math.log(10000) * torch.arange(128, dtype=torch.float32) / 128
    args = timesteps.float()[:, None] * torch.exp(exponent)[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _time_text(sd, prefix, timesteps, pooled):
    t = _sinusoid(timesteps).to(pooled.dtype)
    t = _linear(sd, f"{prefix}.timestep_embedder.linear_2", F.silu(_linear(sd, f"{prefix}.timestep_embedder.linear_1", t)))
    p = _linear(sd, f"{prefix}.text_embedder.linear_2", F.silu(_linear(sd, f"{prefix}.text_embedder.linear_1", pooled)))
    return t + p


def _patch_embed(sd, x, max_size):
    x = F.conv2d(x, sd["pos_embed.proj.weight"], sd["pos_embed.proj.bias"], stride=sd["pos_embed.proj.weight"].shape[-1])
    b, d, h, w = x.shape
    table = sd["pos_embed.pos_embed"].reshape(1, max_size, max_size, d)
    top, left = (max_size - h) // 2, (max_size - w) // 2
    pos = table[:, top:top + h, left:left + w].reshape(1, h * w, d)
    return x.flatten(2).transpose(1, 2) + pos


def _attention(sd, key, h, ctx, heads, lr_key_bug, context_pre_only):
    b = h.shape[0]
    split = lambda t: t.view(b, -1, heads, t.shape[-1] // heads).transpose(1, 2)  # noqa: E731
    x, lr = h.chunk(2, dim=1)
    q, k, v = (split(_linear(sd, f"{key}.{n}", x)) for n in ("to_q", "to_k", "to_v"))
    q_lr = split(_linear(sd, f"{key}.to_q_control", _linear(sd, f"{key}.to_q", lr)))
    k_lr = split(_linear(sd, f"{key}.to_k_control", _linear(sd, f"{key}.to_k", lr)))
    v_lr = split(_linear(sd, f"{key}.to_v_control", _linear(sd, f"{key}.to_v", lr)))
    q, q_lr = _rms(sd, f"{key}.norm_q", q), _rms(sd, f"{key}.norm_q", q_lr)
    k = _rms(sd, f"{key}.norm_k", k)
    k_lr = _rms(sd, f"{key}.norm_k", k if lr_key_bug else k_lr)
    qs, ks, vs = [q, q_lr], [k, k_lr], [v, v_lr]
    if ctx is not None:
        qs.append(_rms(sd, f"{key}.norm_added_q", split(_linear(sd, f"{key}.add_q_proj", ctx))))
        ks.append(_rms(sd, f"{key}.norm_added_k", split(_linear(sd, f"{key}.add_k_proj", ctx))))
        vs.append(split(_linear(sd, f"{key}.add_v_proj", ctx)))
    o = F.scaled_dot_product_attention(torch.cat(qs, 2), torch.cat(ks, 2), torch.cat(vs, 2))
    o = o.transpose(1, 2).reshape(b, -1, h.shape[-1])
    n = x.shape[1]
    out = torch.cat([_linear(sd, f"{key}.to_out.0", o[:, :n]),
                     _linear(sd, f"{key}.to_out_control", o[:, n:2 * n] + lr)], dim=1)
    out_ctx = None
    if ctx is not None and not context_pre_only:
        out_ctx = _linear(sd, f"{key}.to_add_out", o[:, 2 * n:])
    return out, out_ctx


def _ff(sd, key, x, grid=None, lr_conv_scale=1.2):
    hidden = F.gelu(_linear(sd, f"{key}.net.0.proj", x), approximate="tanh")
    if grid is not None:
        img, lr = hidden.chunk(2, dim=1)
        b, n, c = lr.shape
        conv = F.conv2d(lr.transpose(1, 2).reshape(b, c, *grid), sd[f"{key}.control_conv.weight"],
                        sd[f"{key}.control_conv.bias"], padding=1, groups=c)
        hidden = torch.cat([img + lr_conv_scale * conv.reshape(b, c, n).transpose(1, 2), lr], dim=1)
    return _linear(sd, f"{key}.net.2", hidden)


def forward(sd, cfg, hidden_states, lr_latents, context, pooled, timestep, r_timestep=None, lr_key_bug=True):
    """diffusers-call conventions: NCHW latents, timesteps as the embedder sees them (e.g. 1000*sigma)."""
    heads = cfg["num_attention_heads"]
    layers = cfg["num_layers"]
    dual_layers = set(cfg["dual_attention_layers"])
    p = cfg["patch_size"]
    height, width = hidden_states.shape[-2:]
    grid = (height // p, width // p)
    x = torch.cat([_patch_embed(sd, hidden_states, cfg["pos_embed_max_size"]),
                   _patch_embed(sd, lr_latents, cfg["pos_embed_max_size"])], dim=1)
    if r_timestep is None:
        temb = _time_text(sd, "time_text_embed", timestep, pooled)
    else:
        pre = "time_text_embed_interval"
        both = torch.cat([_time_text(sd, f"{pre}.time_text_embed", r_timestep, pooled),
                          _time_text(sd, f"{pre}.time_text_embed", timestep, pooled)], dim=-1)
        temb = _linear(sd, f"{pre}.interval_embedder.2", F.silu(_linear(sd, f"{pre}.interval_embedder.0", both)))
    ctx = _linear(sd, "context_embedder", context)
    emb = F.silu(temb)
    for i in range(layers):
        key = f"transformer_blocks.{i}"
        last, dual = i == layers - 1, i in dual_layers
        mods = _linear(sd, f"{key}.norm1.linear", emb).chunk(9 if dual else 6, dim=1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods[:6]
        cmods = _linear(sd, f"{key}.norm1_context.linear", emb).chunk(2 if last else 6, dim=1)
        if last:
            norm_ctx = _ln(ctx) * (1 + cmods[0][:, None]) + cmods[1][:, None]
        else:
            norm_ctx = _ln(ctx) * (1 + cmods[1][:, None]) + cmods[0][:, None]
        ln_x = _ln(x)
        attn, attn_ctx = _attention(sd, f"{key}.attn", ln_x * (1 + scale_msa[:, None]) + shift_msa[:, None],
                                    norm_ctx, heads, lr_key_bug, last)
        x = x + gate_msa[:, None] * attn
        if dual:
            attn2, _ = _attention(sd, f"{key}.attn2", ln_x * (1 + mods[7][:, None]) + mods[6][:, None],
                                  None, heads, lr_key_bug, False)
            x = x + mods[8][:, None] * attn2
        x = x + gate_mlp[:, None] * _ff(sd, f"{key}.ff", _ln(x) * (1 + scale_mlp[:, None]) + shift_mlp[:, None], grid)
        if not last:
            ctx = ctx + cmods[2][:, None] * attn_ctx
            ctx = ctx + cmods[5][:, None] * _ff(sd, f"{key}.ff_context", _ln(ctx) * (1 + cmods[4][:, None]) + cmods[3][:, None])
    x = x[:, :grid[0] * grid[1]]
    scale, shift = _linear(sd, "norm_out.linear", emb).chunk(2, dim=1)
    x = _linear(sd, "proj_out", _ln(x) * (1 + scale[:, None]) + shift[:, None])
    c = cfg["out_channels"]
    x = x.reshape(x.shape[0], grid[0], grid[1], p, p, c)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, grid[0] * p, grid[1] * p)
