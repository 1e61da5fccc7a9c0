"""One-step x4 SR speed of the full-size SMFSR student (random weights), against the same network in torch.

Cases (`--cases`): `b1` and `b16` are 128->512 (a 512² preprocessed LR, 64² latents, untiled) at batch 1 and 16;
`tiled` is 512->2048 at batch 1 (256² latents, 36 latent tiles of 64² run `--tile_batch` at a time). Each case
times the whole SR function of `SRPipeline` (VAE encode with a posterior sample, one MM-DiT step, VAE decode,
8-bit output, AdaIN colour fix), AOT-compiled before timing, from a host uint8 LR batch to a host uint8 SR batch;
and the one-step transformer alone (tiled where the case is). Medians over `--repeats` after `--warmup` calls.
The PIL preprocessing (bicubic x4 of the LR) is host work outside the timed function.

`--torch` runs the same network in torch in the same process on the same inputs: the MM-DiT of
tests/torch_dit4sr.py over a diffusers-named state dict converted from our weights, diffusers' AutoencoderKL
with our VAE weights, same dtype, SDPA attention, the same latent tiling, eager and with `torch.compile`
(`--torch_compile transformer|all|none`; failures are reported, not fatal). speedup = torch time / our time,
against the faster torch variant. It also reports the largest relative difference between the two transformer
outputs on the same inputs (~1e-2 in bf16, ~1e-6 in fp32 for a correct weight mapping).

  python benchmarks/sr_speed.py --attention cudnn [--cases b1,b16,tiled] [--torch] [--compilation_cache DIR]
  python benchmarks/sr_speed.py --tiny --torch          # CPU check of the whole script, tiny networks

The last line is one JSON object: value = ms per image of the first case, every case in `cases`.
"""

import argparse
import functools
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if "--torch" in sys.argv:
    # JAX grows its GPU pool as needed instead of taking 75 % up front, so torch in this process has the rest.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import harness, sr_memory  # noqa: E402
from smfsr_jax.convert import tensors  # noqa: E402
from smfsr_jax.convert import transformer as convert_transformer  # noqa: E402
from smfsr_jax.convert import vae as convert_vae  # noqa: E402
from smfsr_jax.convert.vae import abstract_params as vae_abstract_params  # noqa: E402
from smfsr_jax.core import cache  # noqa: E402
from smfsr_jax.models import attention, mmdit, vae  # noqa: E402
from smfsr_jax.sampling import pipeline, samplers, tiling  # noqa: E402
from smfsr_jax.sampling.settings import SRSettings  # noqa: E402
from smfsr_jax.training.stages.stage import shapes  # noqa: E402

# name -> (LR side, batch); the SR side is 4x, the preprocessed LR has the SR size.
CASES = {"b1": (128, 1), "b16": (128, 16), "tiled": (512, 1)}
TINY_CASES = {"b1": (8, 1), "b16": (8, 2), "tiled": (32, 1)}
TINY_TILE = dict(tile_size=8, tile_overlap=3)  # 16² tiny latents -> 3x3 tiles, as 256² -> 6x6 at full size
TARGETS = {"b1": {"ms_per_image": 40.0}, "b16": {"images_per_s": 40.0}}
SPEEDUP_TARGET = 1.5


def networks(args):
    """(MM-DiT config, VAE config, text tokens, tiling settings)."""
    if args.tiny:
        tcfg = mmdit.MMDiTConfig.tiny_student(dtype=args.dtype, attention=args.attention)
        ae_cfg = vae.VAEConfig.tiny(dtype=args.dtype)
        return tcfg, ae_cfg, 8, dict(TINY_TILE, tile_batch=args.tile_batch or 4, vae_tile=sr_memory.VAE_TILE)
    tcfg = mmdit.MMDiTConfig.smfsr_student(dtype=args.dtype, attention=args.attention)
    ae_cfg = vae.VAEConfig.sd3(dtype=args.dtype)
    tile = dict(tile_size=tiling.TILE_SIZE, tile_overlap=tiling.TILE_OVERLAP, tile_batch=args.tile_batch or tiling.TILE_BATCH,
                vae_tile=sr_memory.VAE_TILE)
    return tcfg, ae_cfg, harness.TEXT_TOKENS, tile


# ---------------------------------------------------------------------------------------------
# JAX.

def jax_functions(tcfg, ae_cfg, tile):
    """(SR function of SRPipeline, one-step transformer function), both jitted, params as arguments."""
    sr = pipeline.make_sr_function(tcfg, ae_cfg, SRSettings(steps=1, **tile).resolve(tcfg, ae_cfg))
    network = mmdit.MMDiT(tcfg)

    @jax.jit
    def one_step(params, noise, lr_latents, cond):
        velocity = samplers.student_velocity(functools.partial(network.apply, {"params": params}))
        velocity = tiling.tiled_velocity(velocity, tile["tile_size"], tile["tile_overlap"], tile["tile_batch"],
                                         tcfg.patch_size)
        return samplers.one_step(velocity, noise, lr_latents, cond)

    return sr, one_step


def compile_timed(fn, *args):
    start = time.perf_counter()
    compiled = fn.lower(*args).compile()
    return compiled, time.perf_counter() - start


# ---------------------------------------------------------------------------------------------
# torch: the same network from our weights.

def torch_tensor(torch, x, device):
    """A jax array as a torch tensor on `device`: DLPack when both sit on the same device, else via the host."""
    try:
        t = torch.from_dlpack(x)
    except Exception:  # noqa: BLE001 (different devices or an unsupported capsule: copy through numpy)
        a = np.asarray(x)
        t = torch.from_numpy(a.view(np.uint16)).view(torch.bfloat16) if a.dtype == jnp.bfloat16 else torch.from_numpy(a)
    return t.to(device)


def to_torch_layout(torch, fn):
    """Inverse of a converter's torch -> Flax tensor map."""
    inverses = {tensors.linear_kernel: lambda t: t.t(), tensors.conv_kernel: lambda t: t.permute(3, 2, 0, 1),
                np.asarray: lambda t: t}
    if fn not in inverses:
        raise ValueError(f"no inverse for the converter map {fn}")
    return inverses[fn]


def torch_state_dict(torch, params, rules, shapes, device):
    """{diffusers key: tensor} from Flax params; rules: key -> (flax path, converter map, stacked index or None)."""
    flat = tensors.flatten(params)
    sd = {}
    for key, (path, fn, index) in rules.items():
        t = torch_tensor(torch, flat[path], device)
        t = to_torch_layout(torch, fn)(t if index is None else t[index])
        if tuple(t.shape) != tuple(shapes[key]):
            raise ValueError(f"{key}: converted shape {tuple(t.shape)} != diffusers shape {shapes[key]}")
        sd[key] = t.clone(memory_format=torch.contiguous_format)  # owns its memory, independent of JAX
    return sd


def transformer_rules(tcfg):
    rules = {k: (path, fn, None) for k, (path, fn) in convert_transformer._top_rules(tcfg).items()}
    for i in range(tcfg.num_layers):
        group, index = convert_transformer._block_group(tcfg, i)
        for key, (sub, fn) in convert_transformer._block_rules(tcfg, i).items():
            rules[f"transformer_blocks.{i}.{key}"] = (f"{group}/{sub}", fn, None if group == "last_block" else index)
    return rules


class TorchSR:
    """The student SR path in torch: diffusers AutoencoderKL + tests/torch_dit4sr.py, our weights, NCHW."""

    def __init__(self, torch, tcfg, ae_cfg, tparams, ae_params, tile, device, dtype):
        from diffusers import AutoencoderKL
        from tests import torch_dit4sr

        def rms(sd, key, x):  # keeps the input dtype (as diffusers' RMSNorm and our JAX model), for bf16 SDPA
            var = x.float().pow(2).mean(-1, keepdim=True)
            return (x.float() * torch.rsqrt(var + 1e-6) * sd[f"{key}.weight"].float()).to(x.dtype)

        torch_dit4sr._rms = rms
        self.torch, self.device, self.dtype, self.tcfg, self.ae_cfg, self.tile = torch, device, dtype, tcfg, ae_cfg, tile
        self.sd = torch_state_dict(torch, tparams, transformer_rules(tcfg), convert_transformer.expected_shapes(tcfg),
                                   device)
        cfg = {"num_attention_heads": tcfg.num_heads, "num_layers": tcfg.num_layers, "patch_size": tcfg.patch_size,
               "dual_attention_layers": tcfg.dual_attention_layers, "pos_embed_max_size": tcfg.pos_embed_max_size,
               "out_channels": tcfg.out_channels}
        self.transformer = lambda z, lr, ctx, pooled, t, r: torch_dit4sr.forward(  # noqa: E731
            self.sd, cfg, z, lr, ctx, pooled, t * tcfg.time_scale, r * tcfg.time_scale, lr_key_bug=tcfg.lr_key_bug)
        levels = len(ae_cfg.block_out_channels)
        self.vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
            block_out_channels=ae_cfg.block_out_channels, layers_per_block=ae_cfg.layers_per_block,
            latent_channels=ae_cfg.latent_channels, norm_num_groups=ae_cfg.norm_num_groups,
            use_quant_conv=False, use_post_quant_conv=False, scaling_factor=ae_cfg.scaling_factor,
            shift_factor=ae_cfg.shift_factor).to(device=device, dtype=dtype).eval()
        rules = convert_vae._build_rules(ae_cfg, "diffusers")
        vae_sd = torch_state_dict(torch, ae_params, {k: (p, fn, None) for k, (p, fn) in rules.rules.items()},
                                  rules.shapes, device)
        self.vae.load_state_dict(vae_sd, strict=True)

    def compile(self, what: str, mode: str):
        torch = self.torch
        if what in ("transformer", "all"):
            self.transformer = torch.compile(self.transformer, mode=mode, dynamic=False)
        if what == "all":
            self.vae.encoder = torch.compile(self.vae.encoder, mode=mode, dynamic=False)
            self.vae.decoder = torch.compile(self.vae.decoder, mode=mode, dynamic=False)

    def velocity(self, z, lr, ctx, pooled):
        """u(z, r=0, t=1), tiled as tiling.tiled_velocity (Gaussian blend of the tile velocities)."""
        torch, tile = self.torch, self.tile
        b, c, h, w = z.shape
        ones, zeros = torch.ones(1, device=self.device), torch.zeros(1, device=self.device)
        run = lambda z_, lr_, idx: self.transformer(z_, lr_, ctx[idx], pooled[idx],  # noqa: E731
                                                    ones.expand(len(idx)), zeros.expand(len(idx)))
        if not tiling.needs_tiling(h, w, tile["tile_size"], self.tcfg.patch_size):
            return run(z, lr, torch.arange(b, device=self.device))
        layout = tiling.tile_layout(h, w, tile["tile_size"], tile["tile_overlap"], self.tcfg.patch_size)
        size, boxes = layout.tile, layout.boxes
        crops = lambda a: torch.cat([a[:, :, y:y + size, x:x + size] for y, x in boxes])  # noqa: E731
        z_tiles, lr_tiles = crops(z), crops(lr)
        index = torch.arange(b, device=self.device).repeat(len(boxes))
        chunk = tile["tile_batch"]
        u = torch.cat([run(z_tiles[i:i + chunk], lr_tiles[i:i + chunk], index[i:i + chunk])
                       for i in range(0, len(index), chunk)]).view(len(boxes), b, c, size, size)
        weights = torch.from_numpy(layout.weights).to(self.device, u.dtype)
        blended = torch.zeros_like(z, dtype=u.dtype)
        for k, (y, x) in enumerate(boxes):
            blended[:, :, y:y + size, x:x + size] += u[k] * weights
        return blended / torch.from_numpy(layout.weight_sum()).to(self.device, u.dtype)

    def one_step(self, noise, lr_latents, ctx, pooled):
        return noise - self.velocity(noise, lr_latents, ctx, pooled)

    def sr(self, lr_uint8, ctx, pooled):
        """(B, H, W, 3) uint8 host numpy -> (B, H, W, 3) uint8 host numpy, as pipeline.make_sr_function."""
        torch, cfg = self.torch, self.ae_cfg
        lr = torch.from_numpy(lr_uint8).to(self.device).permute(0, 3, 1, 2)
        x = (lr.to(self.dtype) / 255.0 * 2.0 - 1.0)
        z_lr = (self.vae.encode(x).latent_dist.sample() - cfg.shift_factor) * cfg.scaling_factor
        noise = torch.randn(z_lr.shape, device=self.device, dtype=self.dtype)
        z = self.one_step(noise, z_lr, ctx, pooled)
        decoded = self.vae.decode(z / cfg.scaling_factor + cfg.shift_factor).sample.float()
        sr = torch.round(torch.clamp(decoded / 2.0 + 0.5, 0.0, 1.0) * 255.0).to(torch.uint8)
        images, source = sr.float() / 255.0, lr.float() / 255.0  # AdaIN colour fix (sampling/color.py)
        mean, std = images.mean((2, 3), keepdim=True), (images.var((2, 3), keepdim=True) + 1e-5).sqrt()
        s_mean, s_std = source.mean((2, 3), keepdim=True), (source.var((2, 3), keepdim=True) + 1e-5).sqrt()
        fixed = (torch.clamp((images - mean) / std * s_std + s_mean, 0.0, 1.0) * 255.0).to(torch.uint8)
        return fixed.permute(0, 2, 3, 1).cpu().numpy()


def torch_measure(torch, model, case, args):
    """Times of one torch variant on a case's inputs: e2e (host uint8 in and out) and the transformer step."""
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    ctx, pooled, noise, lr_latents = case["torch_inputs"]

    def step():
        out = model.one_step(noise, lr_latents, ctx, pooled)
        sync()
        return out

    with torch.inference_mode():
        start = time.perf_counter()
        first = step()
        model.sr(case["lr"], ctx, pooled)
        first_s = time.perf_counter() - start  # includes torch.compile's compilation when compiled
        step_s, _ = harness.median_seconds(step, args.repeats, args.warmup)
        sr_s, _ = harness.median_seconds(lambda: model.sr(case["lr"], ctx, pooled), args.repeats, args.warmup)
    return {"ms_per_batch": round(sr_s * 1e3, 2), "ms_per_image": round(sr_s * 1e3 / case["batch"], 2),
            "images_per_s": round(case["batch"] / sr_s, 2), "transformer_ms": round(step_s * 1e3, 2),
            "first_call_s": round(first_s, 1)}, first.permute(0, 2, 3, 1).float().cpu().numpy()


# ---------------------------------------------------------------------------------------------

def make_case(name, args, tcfg, ae_cfg, tokens, rng):
    lr_side, batch = (TINY_CASES if args.tiny else CASES)[name]
    side = 4 * lr_side
    latent = side // ae_cfg.downscale
    ctx = rng.normal(size=(batch, tokens, tcfg.joint_attention_dim)).astype(np.float32)
    pooled = rng.normal(size=(batch, tcfg.pooled_projection_dim)).astype(np.float32)
    return {"name": name, "lr_side": lr_side, "sr_side": side, "batch": batch, "latent": latent,
            "lr": rng.integers(0, 256, (batch, side, side, 3), dtype=np.uint8),
            "cond": {samplers.CONTEXT: jax.device_put(ctx), samplers.POOLED: jax.device_put(pooled)},
            "noise": jax.device_put(rng.normal(size=(batch, latent, latent, 16)).astype(np.float32)),
            "lr_latents": jax.device_put(rng.normal(size=(batch, latent, latent, 16)).astype(np.float32)),
            "keys": pipeline.image_keys(0, range(batch))}


def jax_measure(case, sr_fn, one_step, tparams, ae_params, args):
    lr_device = jax.device_put(case["lr"])
    sr, sr_compile = compile_timed(sr_fn, tparams, ae_params, lr_device, case["keys"], case["cond"])
    step, step_compile = compile_timed(one_step, tparams, case["noise"], case["lr_latents"], case["cond"])
    run_sr = lambda: np.asarray(sr(tparams, ae_params, jax.device_put(case["lr"]), case["keys"], case["cond"]))  # noqa: E731
    run_step = lambda: step(tparams, case["noise"], case["lr_latents"], case["cond"]).block_until_ready()  # noqa: E731
    sr_s, times = harness.median_seconds(run_sr, args.repeats, args.warmup)
    step_s, _ = harness.median_seconds(run_step, args.repeats, args.warmup)
    out = np.asarray(run_step())
    return {"ms_per_batch": round(sr_s * 1e3, 2), "ms_per_image": round(sr_s * 1e3 / case["batch"], 2),
            "images_per_s": round(case["batch"] / sr_s, 2), "transformer_ms": round(step_s * 1e3, 2),
            "compile_s": round(sr_compile + step_compile, 1), "finite": bool(np.isfinite(out).all()),
            "times_ms": [round(t * 1e3, 2) for t in times]}, out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny networks and images (CPU validation)")
    parser.add_argument("--cases", default="b1,b16,tiled", help=f"comma list of {sorted(CASES)}")
    parser.add_argument("--attention", choices=("cudnn", "xla", "splash"), default=None,
                        help="MM-DiT attention (default: the platform's fused kernel, cudnn on a GPU, splash on a TPU, "
                             "else xla)")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                        help="compute and weight dtype of both frameworks")
    parser.add_argument("--tile_batch", type=int, default=None, help="latent tiles per transformer call")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls (default 20; 3 with --tiny)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 2; 1 with --tiny)")
    parser.add_argument("--torch", action="store_true", help="also run the same network in torch")
    parser.add_argument("--torch_compile", choices=("none", "transformer", "all"), default="transformer")
    parser.add_argument("--torch_compile_mode", default="default",
                        help="torch.compile mode (default, reduce-overhead, max-autotune, ...)")
    parser.add_argument("--compilation_cache", default=None, help="jax persistent compilation cache directory")
    args = parser.parse_args()
    cases = args.cases.split(",")
    if unknown := sorted(set(cases) - set(CASES)):
        parser.error(f"unknown cases {unknown}; choose from {sorted(CASES)}")
    args.repeats = args.repeats or (3 if args.tiny else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 2)
    args.attention = args.attention or attention.fused_implementation() or "xla"
    if args.compilation_cache:
        cache.keep_compiled_in(args.compilation_cache)

    tcfg, ae_cfg, tokens, tile = networks(args)
    dtype = jnp.dtype(args.dtype)
    start = time.perf_counter()
    tparams = harness.random_tree(shapes(mmdit.abstract_params(tcfg), dtype), seed=0)
    ae_params = harness.random_tree(shapes(vae_abstract_params(ae_cfg), dtype), seed=1)
    jax.block_until_ready((tparams, ae_params))
    print(f"random weights: {sum(x.size for x in jax.tree.leaves(tparams)) / 1e6:.1f}M transformer, "
          f"{sum(x.size for x in jax.tree.leaves(ae_params)) / 1e6:.1f}M VAE, {time.perf_counter() - start:.1f} s")
    sr_fn, one_step = jax_functions(tcfg, ae_cfg, tile)
    rng = np.random.default_rng(0)
    case_list = [make_case(name, args, tcfg, ae_cfg, tokens, rng) for name in cases]

    torch_models = {}
    if args.torch:
        import torch
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if args.tiny and device.type == "cpu":
            torch.set_num_threads(1)  # tiny ops: OpenMP threads contending with XLA's pool cost 100x
        torch_dtype = getattr(torch, args.dtype)
        for case in case_list:
            t = lambda a: torch.from_numpy(np.array(a)).to(device, torch_dtype)  # noqa: E731
            nchw = lambda a: t(a).permute(0, 3, 1, 2).contiguous()  # noqa: E731
            case["torch_inputs"] = (t(case["cond"][samplers.CONTEXT]), t(case["cond"][samplers.POOLED]),
                                    nchw(case["noise"]), nchw(case["lr_latents"]))
        torch_models["eager"] = TorchSR(torch, tcfg, ae_cfg, tparams, ae_params, tile, device, torch_dtype)
        if args.torch_compile != "none":
            compiled = TorchSR(torch, tcfg, ae_cfg, tparams, ae_params, tile, device, torch_dtype)
            compiled.compile(args.torch_compile, args.torch_compile_mode)
            torch_models[f"compiled_{args.torch_compile}"] = compiled

    results = []
    for case in case_list:
        tiles = 1
        if tiling.needs_tiling(case["latent"], case["latent"], tile["tile_size"], tcfg.patch_size):
            layout = tiling.tile_layout(case["latent"], case["latent"], tile["tile_size"], tile["tile_overlap"],
                                        tcfg.patch_size)
            tiles = len(layout.boxes)
        ours, out = jax_measure(case, sr_fn, one_step, tparams, ae_params, args)
        result = {"case": case["name"], "lr_side": case["lr_side"], "sr_side": case["sr_side"],
                  "batch": case["batch"], "latent": case["latent"], "tiles": tiles, "jax": ours}
        print(f"[{case['name']}] {case['lr_side']}->{case['sr_side']} batch {case['batch']}: jax "
              f"{ours['ms_per_image']} ms/image, {ours['images_per_s']} images/s, transformer {ours['transformer_ms']} ms, "
              f"compile {ours['compile_s']} s")
        if torch_models:
            result["torch"] = {}
            for variant, model in torch_models.items():
                try:
                    measured, reference = torch_measure(torch, model, case, args)
                except Exception as e:  # noqa: BLE001 (torch.compile failures are reported, not fatal)
                    result["torch"][variant] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
                    print(f"[{case['name']}] torch {variant} failed: {result['torch'][variant]['error']}")
                    continue
                measured["max_rel_diff_transformer"] = float(np.abs(out - reference).max() / np.abs(reference).max())
                result["torch"][variant] = measured
                print(f"[{case['name']}] torch {variant}: {measured['ms_per_image']} ms/image, transformer "
                      f"{measured['transformer_ms']} ms, first call {measured['first_call_s']} s, "
                      f"rel diff {measured['max_rel_diff_transformer']:.2e}")
            timed = [m for m in result["torch"].values() if "error" not in m]
            if timed:
                best = min(timed, key=lambda m: m["ms_per_batch"])
                result["speedup"] = round(best["ms_per_batch"] / ours["ms_per_batch"], 3)
                result["speedup_transformer"] = round(min(m["transformer_ms"] for m in timed)
                                                      / ours["transformer_ms"], 3)
                result["speedup_vs_eager"] = round(result["torch"]["eager"]["ms_per_batch"] / ours["ms_per_batch"], 3) \
                    if "error" not in result["torch"]["eager"] else None
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if not args.tiny and case["name"] in TARGETS:
            (key, target), = TARGETS[case["name"]].items()
            result["target"] = {key: target, "met": ours[key] <= target if key == "ms_per_image" else ours[key] >= target}
        results.append(result)

    headline = results[0]
    print(json.dumps({
        "name": "sr_speed_tiny" if args.tiny else "sr_speed_smfsr_student", "value": headline["jax"]["ms_per_image"],
        "unit": "ms/image", "speedup": headline.get("speedup"), "speedup_target": SPEEDUP_TARGET,
        "cases": results,
        "config": {"network": "tiny_student" if args.tiny else "smfsr_student", "dtype": args.dtype,
                   "attention": args.attention, "weights": "random", "steps": 1, "color_fix": "adain",
                   "text_tokens": tokens, **tile, "torch_compile": args.torch_compile if args.torch else None,
                   "torch_compile_mode": args.torch_compile_mode if args.torch else None,
                   "repeats": args.repeats, "warmup": args.warmup},
        **harness.environment(), **({"torch": torch.__version__} if args.torch else {})}))


if __name__ == "__main__":
    main()
