"""FLOP audit and roofline: the network's FLOPs written out layer by layer against XLA's count of the compiled
function, and the least time each case can take on the accelerators we target.

  python benchmarks/flop_audit.py                    # SD3.5-M student/teacher, SD3 VAE, 512² (a few minutes)
  python benchmarks/flop_audit.py --tiny             # tiny networks: a check of the script

Analytic count (`mmdit_layers`, `vae_layers`): every matrix product and convolution of one forward pass, 2 FLOPs
per multiply-add, per layer: the attention projections, the attention scores and weighted sums, the MLPs, the
adaLN modulations, the embedders, the LR stream's control projections and depthwise conv, the VAE convolutions and
its mid-block attention. Elementwise work (norms, activations, softmax) is left out: XLA counts it, so a ratio a
few % above 1 is expected; a pass computed twice would show as 2.
A training step is composed from those passes (`step_passes`): a pass that trains runs forward, again in the
backward pass (remat "full" recomputes every block) and backward, where a product costs its forward again for the
input gradient (every layer above the first trainable one needs it) and once more for the weight gradient of
trainable weights, and attention's scores and weighted sums cost twice their forward (the recomputation leaves
out the MLPs' last projections when only their gates would need them); passes without gradient
(the VAE encodings, the teacher's target, the stop-gradient split targets) run forward once.

XLA's count: `cost_analysis()` of the function lowered with the block scans unrolled and, for the ISC step, one
branch of its `lax.cond` at a time (`harness.flop_counting`); HloCostAnalysis otherwise counts a loop body once
and a conditional as its costlier branch. The SR cases are the untiled ones: the tiled VAE and the latent-tile
loop run passes inside loops by design (models/vae_tiling.py states their cost).

Roofline: time >= max(FLOPs / peak FLOP/s, bytes / HBM bandwidth) per device, with the analytic FLOPs and, as
bytes, what must cross HBM at least once: the weights in their dtype, the trainable fp32 weights, their AdamW
moments and gradients read and written (train steps), the input and output images. Peaks are the vendors'
(`harness.ACCELERATORS`, dense bf16). Each line also gives the target's share of that bound.

One JSON line per case, then one summary line: value = the largest XLA / analytic ratio.
"""

import argparse
import json
import os
import re
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import harness, sr_memory  # noqa: E402
from configs import student_gan, student_isc, student_reward, teacher_fm  # noqa: E402
from smfsr_jax.models import discriminator as disc_lib  # noqa: E402
from smfsr_jax.models import lpips as lpips_lib  # noqa: E402
from smfsr_jax.models import mmdit, vae  # noqa: E402
from smfsr_jax.objectives import rewards as rewards_lib  # noqa: E402
from smfsr_jax.sampling import tiling  # noqa: E402
from smfsr_jax.training import partition  # noqa: E402
from smfsr_jax.training import state as state_lib  # noqa: E402
from smfsr_jax.training.stages import gan as gan_stage  # noqa: E402
from smfsr_jax.training.stages import loading  # noqa: E402
from smfsr_jax.training.stages import reward as reward_stage  # noqa: E402

EXCESS_LIMIT = 0.05
# Targets of the README's GPU table, per case: seconds per call (SR) or the MFU a step must reach.
TARGETS = {"sr_b1": {"seconds": 0.040}, "sr_b16": {"seconds": 16 / 40.0}, "teacher_fm": {"mfu": 0.40},
           "student_isc": {"mfu": 0.40}, "student_gan": {"mfu": 0.30}}


GATED_OUTPUTS = ("/ff/fc2", "/ff_context/fc2")


# ---------------------------------------------------------------------------------------------
# Analytic FLOPs of one forward pass, layer by layer: (name, kind, FLOPs, weight path or None).
# kind: "dense" (a product with a weight), "attention" (scores and weighted sums), "conv".

def dense(name, tokens, fan_in, fan_out, path=None):
    return (name, "dense", 2.0 * tokens * fan_in * fan_out, path or name)


def mmdit_layers(cfg: mmdit.MMDiTConfig, batch: int, latent: tuple, text_tokens: int) -> list:
    """One forward pass of the MM-DiT on `batch` latents of shape `latent` (h, w) with `text_tokens` tokens."""
    d, p = cfg.hidden_size, cfg.patch_size
    n = batch * (latent[0] // p) * (latent[1] // p)  # image tokens over the batch
    lr = n if cfg.lr_stream else 0
    c = batch * text_tokens
    layers = [dense("pos_embed/proj", n + lr, p * p * cfg.in_channels, d),
              dense("context_embedder", c, cfg.joint_attention_dim, d)]
    embedders = 2 if cfg.time_conditioning == "interval" else 1
    for e in range(embedders):
        prefix = "time_text_embed_interval/time_text_embed" if embedders == 2 else "time_text_embed"
        layers += [dense(f"{prefix}/timestep_embedder[{e}]", batch, 256, d, f"{prefix}/timestep_embedder/"),
                   dense(f"{prefix}/timestep_embedder.2[{e}]", batch, d, d, f"{prefix}/timestep_embedder/"),
                   dense(f"{prefix}/text_embedder[{e}]", batch, cfg.pooled_projection_dim, d, f"{prefix}/text_embedder/"),
                   dense(f"{prefix}/text_embedder.2[{e}]", batch, d, d, f"{prefix}/text_embedder/")]
    if embedders == 2:
        layers += [dense("time_text_embed_interval/interval_embedder", batch, 2 * d, d),
                   dense("time_text_embed_interval/interval_embedder.2", batch, d, d,
                         "time_text_embed_interval/interval_embedder")]

    def attention_layers(block, name, with_context, context_out):
        seq = (n + lr + (c if with_context else 0)) // batch
        out = [dense(f"{block}/{name}/to_{x}", n, d, d) for x in "qkv"] + [dense(f"{block}/{name}/to_out", n, d, d)]
        if cfg.lr_stream:
            out += [dense(f"{block}/{name}/to_{x}(lr)", lr, d, d, f"{block}/{name}/to_{x}") for x in "qv"]
            out += [dense(f"{block}/{name}/to_{x}_control", lr, d, d) for x in "qv"]
            if not (cfg.qk_norm and cfg.lr_key_bug):  # the released layout takes the LR keys from the image keys
                out += [dense(f"{block}/{name}/to_k(lr)", lr, d, d, f"{block}/{name}/to_k"),
                        dense(f"{block}/{name}/to_k_control", lr, d, d)]
            out.append(dense(f"{block}/{name}/to_out_control", lr, d, d))
        if with_context:
            out += [dense(f"{block}/{name}/add_{x}_proj", c, d, d) for x in "qkv"]
            if context_out:
                out.append(dense(f"{block}/{name}/to_add_out", c, d, d))
        out.append((f"{block}/{name}/scores+weighted_sum", "attention", 2 * 2.0 * batch * seq * seq * d, None))
        return out

    blocks = [(f"block_{i}", i in cfg.dual_attention_layers, i == cfg.num_layers - 1) for i in range(cfg.num_layers)]
    for block, dual, last in blocks:
        layers.append(dense(f"{block}/norm1", batch, d, (9 if dual else 6) * d))
        layers.append(dense(f"{block}/norm1_context", batch, d, (2 if last else 6) * d))
        layers += attention_layers(block, "attn", True, not last)
        if dual:
            layers += attention_layers(block, "attn2", False, False)
        layers += [dense(f"{block}/ff/fc1", n + lr, d, 4 * d), dense(f"{block}/ff/fc2", n + lr, 4 * d, d)]
        if cfg.lr_stream:
            layers.append((f"{block}/ff/control_conv", "conv", 2.0 * 9 * lr * 4 * d, f"{block}/ff/control_conv"))
        if not last:
            layers += [dense(f"{block}/ff_context/fc1", c, d, 4 * d), dense(f"{block}/ff_context/fc2", c, 4 * d, d)]
    layers += [dense("norm_out", batch, d, 2 * d), dense("proj_out", n, d, p * p * cfg.out_channels)]
    return layers


def conv(name, batch, side, cin, cout, kernel=3):
    """A stride-1 convolution over a side² map with zero padding (kernel - 1) / 2: XLA counts the taps that fall
    inside the map, (kernel * side - 2 * sum of the padding)² per image and channel pair."""
    pad = (kernel - 1) // 2
    taps = (kernel * side - pad * (pad + 1)) ** 2
    return (name, "conv", 2.0 * batch * taps * cin * cout, name)


def strided_conv(name, batch, side_out, cin, cout, kernel=3):
    """The downsample: an explicitly padded input and a VALID stride-2 conv, every tap counted."""
    return (name, "conv", 2.0 * batch * side_out * side_out * kernel * kernel * cin * cout, name)


def vae_layers(cfg: vae.VAEConfig, batch: int, side: int, part: str) -> list:
    """One encode of `batch` images of side `side`, or one decode of latents of that image side."""
    if cfg.kind != "kl":
        return []  # the pixel latent has no weights: a reshape and one small matrix
    channels = cfg.block_out_channels
    levels = len(channels)

    def resnet(name, size, cin, cout):
        out = [conv(f"{name}/conv1", batch, size, cin, cout), conv(f"{name}/conv2", batch, size, cout, cout)]
        return out + ([conv(f"{name}/conv_shortcut", batch, size, cin, cout, 1)] if cin != cout else [])

    def mid(name, size, ch):
        tokens = size * size
        return (resnet(f"{name}/resnets_0", size, ch, ch)
                + [dense(f"{name}/attentions_0/to_{x}", batch * tokens, ch, ch) for x in ("q", "k", "v", "out")]
                + [(f"{name}/attentions_0/scores+weighted_sum", "attention", 2 * 2.0 * batch * tokens * tokens * ch,
                    None)]
                + resnet(f"{name}/resnets_1", size, ch, ch))

    layers = []
    if part == "encode":
        size = side
        layers.append(conv("encoder/conv_in", batch, size, cfg.in_channels, channels[0]))
        cin = channels[0]
        for level, ch in enumerate(channels):
            for j in range(cfg.layers_per_block):
                layers += resnet(f"encoder/down_{level}/resnets_{j}", size, cin, ch)
                cin = ch
            if level < levels - 1:
                size //= 2
                layers.append(strided_conv(f"encoder/down_{level}/downsample", batch, size, ch, ch))
        layers += mid("encoder/mid", size, cin)
        layers.append(conv("encoder/conv_out", batch, size, cin, 2 * cfg.latent_channels))
        return layers
    size = side // cfg.downscale
    cin = channels[-1]
    layers.append(conv("decoder/conv_in", batch, size, cfg.latent_channels, cin))
    layers += mid("decoder/mid", size, cin)
    for i, ch in enumerate(reversed(channels)):
        for j in range(cfg.layers_per_block + 1):
            layers += resnet(f"decoder/up_{i}/resnets_{j}", size, cin, ch)
            cin = ch
        if i < levels - 1:
            size *= 2
            layers.append(conv(f"decoder/up_{i}/upsample", batch, size, ch, ch))
    layers.append(conv("decoder/conv_out", batch, size, cin, cfg.out_channels))
    return layers


def forward(layers) -> float:
    return sum(flops for _, _, flops, _ in layers)


def trained_pass(layers, trainable: list, remat: bool) -> float:
    """FLOPs of a pass whose weights matching `trainable` (regexes on the layer's weight path) get gradients:
    forward, the remat recomputation of the blocks, and backward (module docstring)."""
    def trains(path):
        return path is not None and any(re.search(pattern, path + "/") for pattern in trainable)

    first = next((i for i, layer in enumerate(layers) if trains(layer[3])), len(layers))
    # The MLPs' last projections make the block's output (`x + gate * fc2(...)`), which the scan keeps as its carry:
    # the recomputation needs them only for the gate's gradient, which exists when the time embedding trains.
    gates_train = any(trains(path) for name, _, _, path in layers if not name.startswith("block_"))
    total = forward(layers)
    for i, (name, kind, flops, path) in enumerate(layers):
        if remat and name.startswith("block_") and (gates_train or not name.endswith(GATED_OUTPUTS)):
            total += flops
        if kind == "attention":
            total += 2 * flops if i >= first else 0
            continue
        # Embedders feed the blocks but read no trainable output: no input gradient below the first trainable layer.
        below = i < first or not name.startswith("block_") and not trains(path)
        total += (0 if below else flops) + (flops if trains(path) else 0)
    return total


def input_gradient_pass(layers) -> float:
    """A frozen network (no remat) that passes a gradient to its input: forward, then each product again for its
    input gradient and attention twice."""
    return sum(flops * (4 if kind == "attention" else 2) for _, kind, flops, _ in layers)


# ---------------------------------------------------------------------------------------------
# Networks outside the MM-DiT and the VAE (LPIPS, DINOv3 and its heads, the IQA rewards): XLA's count of the network
# alone, forward or forward and backward, composed into the step like the analytic passes.

def xla_flops(fn, *args) -> float:
    with harness.flop_counting():
        return harness.cost_flops(jax.jit(lambda *a: fn(*a)).lower(*args))


def gan_auxiliary(config, stage, batch: int, side: int) -> dict:
    lpips_config, _ = loading.load_lpips(config.rec.lpips, abstract=True)
    disc_config, *_ = gan_stage.load_discriminator(config.disc, config.seed, abstract=True)
    lpips_model, heads = lpips_lib.LPIPS(lpips_config), disc_lib.Discriminator(disc_config)
    images = jax.ShapeDtypeStruct((batch, side, side, 3), jnp.float32)
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32)
    frozen, trainable, state = stage.frozen, stage.trainable, stage.model_state
    lpips = lambda p, a, b: lpips_model.apply({"params": p}, a, b).sum()  # noqa: E731
    features = lambda p, x, key: disc_lib.backbone_features(p, x, disc_config, rng=key)  # noqa: E731
    dino = lambda p, x, key: sum(f.astype(jnp.float32).sum() for f in features(p, x, key))  # noqa: E731
    feats = jax.eval_shape(features, frozen["dinov3"], images, rng)
    logits = lambda h, f, st: heads.apply({"params": h, **st}, f).astype(jnp.float32).sum()  # noqa: E731
    return {"lpips_with_gradient": xla_flops(jax.grad(lpips, argnums=1), frozen["lpips"], images, images),
            "dinov3_with_gradient": xla_flops(jax.grad(dino, argnums=1), frozen["dinov3"], images, rng),
            "dinov3_forward": xla_flops(features, frozen["dinov3"], images, rng),
            # the generator's logits (gradient to the features), then real and fake (gradient to the heads)
            "heads": xla_flops(jax.grad(logits, argnums=1), trainable["discriminator"], feats, state)
            + 2 * xla_flops(jax.grad(logits), trainable["discriminator"], feats, state)}


def reward_forward(config, stage, count: int, side: int) -> float:
    reward_fns, _ = reward_stage.load_rewards(config.reward, abstract=True)
    score = rewards_lib.combined(reward_fns)
    images = jax.ShapeDtypeStruct((count, side, side, 3), jnp.float32)
    seeded = {"hr": jax.ShapeDtypeStruct((count, side, side, 3), jnp.uint8),
              "lr": jax.ShapeDtypeStruct((count, side // 4, side // 4, 3), jnp.uint8)}
    return xla_flops(lambda p, x, b: score(p, x, b), stage.frozen["rewards"], images, seeded)


# ---------------------------------------------------------------------------------------------
# Cases.

def sr_analytic(tcfg, ae_cfg, tokens: int, side: int, batch: int) -> dict:
    latent = (side // ae_cfg.downscale,) * 2
    return {"vae_encode": forward(vae_layers(ae_cfg, batch, side, "encode")),
            "mmdit": forward(mmdit_layers(tcfg, batch, latent, tokens)),
            "vae_decode": forward(vae_layers(ae_cfg, batch, side, "decode"))}


def sr_tiled_analytic(tcfg, ae_cfg, tokens: int, side: int) -> dict:
    """512² -> 2048²: the MM-DiT on overlapping latent tiles in chunks of at most TILE_BATCH (as SRPipeline runs
    it), and the VAE counted once over the whole image; the tiled VAE repeats its convolutions by design (one pass
    per GroupNorm, models/vae_tiling.py), which XLA cannot count here (its passes are a loop with a condition)."""
    latent = side // ae_cfg.downscale
    if tiling.needs_tiling(latent, latent, tiling.TILE_SIZE, tcfg.patch_size):
        layout = tiling.tile_layout(latent, latent)
        tiles, tile = len(layout.boxes), layout.tile
    else:
        tiles, tile = 1, latent
    chunks = -(-tiles // tiling.TILE_BATCH)
    computed = chunks * -(-tiles // chunks)  # map_in_chunks: equal chunks, the last padded
    per_tile = forward(mmdit_layers(tcfg, 1, (tile, tile), tokens))
    return {"mmdit_tiles": tiles * per_tile, "mmdit_chunk_padding": (computed - tiles) * per_tile,
            "vae_encode_once": forward(vae_layers(ae_cfg, 1, side, "encode")),
            "vae_decode_once": forward(vae_layers(ae_cfg, 1, side, "decode"))}


def sr_xla(tcfg, ae_cfg, tokens: int, side: int, batch: int) -> float:
    with harness.flop_counting():
        fn, args = sr_memory.sr_function(tcfg, ae_cfg, tokens, jnp.dtype(tcfg.dtype), side, batch, vae_tile=0)
        return harness.cost_flops(jax.jit(lambda *a: fn(*a)).lower(*args))


def step_passes(stage_name: str, config, stage, batch: int, side: int) -> dict:
    """{branch: {pass: FLOPs}} of one training step (module docstring)."""
    ae_cfg, student = stage.autoencoder_config, stage.model_config
    latent = (side // ae_cfg.downscale,) * 2
    tokens = stage.frozen["null"]["prompt_embeds"].shape[0]
    remat = student.remat_policy != "none"
    encodes = 2 * forward(vae_layers(ae_cfg, batch, side, "encode"))  # HR and the upsampled LR
    model = mmdit_layers(student, batch, latent, tokens)
    trainable = list(config.trainable)
    if stage_name == "student_reward" and config.lora.rank:
        trainable = list(config.lora.targets)  # adapters on these kernels: their merged weights get the gradient
    trained = trained_pass(model, trainable, remat)
    if stage_name == "teacher_fm":
        return {"step": {"vae_encodes": encodes, "teacher_trained": trained}}
    teacher_layers = mmdit_layers(stage.teacher_config, batch, latent, tokens)
    teacher = forward(teacher_layers)
    isc_branches = {"boundary": {"student_trained": trained, "teacher_target": teacher},
                    "split": {"student_trained": trained, "split_targets": 2 * forward(model)}}
    if stage_name == "student_isc":
        return {branch: {"vae_encodes": encodes, **passes} for branch, passes in isc_branches.items()}
    if stage_name == "student_gan":
        decode = vae_layers(ae_cfg, batch, side, "decode")
        shared = {"vae_encodes": encodes, "generation_trained": trained,
                  "vae_decode_with_gradient": input_gradient_pass(decode),
                  "vsd_teacher_cfg_and_regularizer": 3 * teacher,
                  "regularizer_trained": trained_pass(teacher_layers, ["control"], remat),
                  **gan_auxiliary(config, stage, batch, side)}
        return {branch: {**shared, **{f"isc_{k}": v for k, v in passes.items()}}
                for branch, passes in isc_branches.items()}
    count = batch * config.reward.seeds
    rollout_layers = mmdit_layers(student, count, latent, tokens)
    shared = {"vae_encodes": encodes,
              "rollout_old_policy": forward(rollout_layers),
              "rollout_decode": forward(vae_layers(ae_cfg, count, side, "decode")),
              "rollout_rewards": reward_forward(config, stage, count, side),
              "nft_trained": trained_pass(rollout_layers, trainable, remat),
              "nft_old_and_reference": 2 * forward(rollout_layers)}
    return {branch: {**shared, **{f"isc_{k}": v for k, v in passes.items()}}
            for branch, passes in isc_branches.items()}


def step_xla(stage_name: str, config, stage, optimizer, state, batch: int, side: int) -> dict:
    update = state_lib.make_train_step(stage.loss_fn, optimizer, seed=0)
    abstract_batch = harness.train_batch(stage.frozen["null"], batch, side)
    branches = {"step": None} if stage_name == "teacher_fm" else {"boundary": True, "split": False}
    out = {}
    for name, branch in branches.items():
        with harness.flop_counting(branch):
            out[name] = harness.cost_flops(jax.jit(lambda *a: update(*a)).lower(state, stage.frozen, abstract_batch))
    return out


def tree_bytes(tree) -> float:
    return float(sum(np.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def roofline(flops: float, bytes_moved: float) -> dict:
    """{accelerator: lower bound in ms} per device."""
    return {name: round(1e3 * max(flops / (peak["bf16_tflops"] * 1e12), bytes_moved / (peak["hbm_tb_s"] * 1e12)), 3)
            for name, peak in harness.ACCELERATORS.items()}


def target_share(case: str, bound_ms: dict) -> dict | None:
    """The target beside the bound: a time target t is met at bound / t of the peak; an MFU target m means a step
    time of bound / m."""
    target = TARGETS.get(case)
    if not target:
        return None
    if "mfu" in target:
        return {"target_mfu_percent": 100 * target["mfu"],
                "target_step_ms": {k: round(v / target["mfu"], 1) for k, v in bound_ms.items()}}
    return {"target_ms": 1e3 * target["seconds"],
            "bound_percent_of_target": {k: round(100 * v / (1e3 * target["seconds"]), 1) for k, v in bound_ms.items()}}


def report(case: str, variant: str, analytic: dict, xla: dict, bytes_moved: float, extra: dict,
           p_boundary: float | None = None) -> dict:
    """One line: per branch the analytic FLOPs by pass, XLA's count and their ratio; the roofline of the expected
    step (the ISC branches weighted by p_boundary)."""
    branches = {}
    for branch, passes in analytic.items():
        total = sum(passes.values())
        counted = xla.get(branch)
        branches[branch] = {"analytic_gflops": round(total / 1e9, 2),
                            "xla_gflops": None if counted is None else round(counted / 1e9, 2),
                            "ratio": None if counted is None else round(counted / total, 4),
                            "passes_gflops": {k: round(v / 1e9, 2) for k, v in passes.items()}}
    totals = {branch: sum(passes.values()) for branch, passes in analytic.items()}
    flops = (p_boundary * totals["boundary"] + (1 - p_boundary) * totals["split"] if p_boundary is not None
             else next(iter(totals.values())))
    bound = roofline(flops, bytes_moved)
    line = {"name": "flop_audit", "case": f"{case}_{variant}", "branches": branches,
            "expected_gflops": round(flops / 1e9, 2),
            "worst_ratio": max((b["ratio"] for b in branches.values() if b["ratio"]), default=None),
            "bytes_lower_bound_gb": round(bytes_moved / 1e9, 3),
            "roofline_ms": bound, **extra}
    share = target_share(case, bound)
    if share:
        line["target"] = share
    print(json.dumps(line), flush=True)
    return line


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny networks and sizes (a check of the script)")
    parser.add_argument("--cases",
                        default="sr_b1,sr_b16,sr_tiled,teacher_fm,student_isc,student_gan,student_reward")
    args = parser.parse_args()
    chosen = args.cases.split(",")
    variant = "tiny" if args.tiny else "sd35m"
    dtype = "bfloat16"
    tcfg, ae_cfg, tokens = sr_memory.networks(args.tiny, dtype)
    # SR reads every weight once, in bf16.
    weights = tree_bytes(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16),
                                      (mmdit.abstract_params(tcfg), sr_memory.vae_abstract_params(ae_cfg))))
    lines = []
    for case, batch in (("sr_b1", 1), ("sr_b16", 4 if args.tiny else 16)):
        if case not in chosen:
            continue
        side = 32 if args.tiny else 512
        analytic = sr_analytic(tcfg, ae_cfg, tokens, side, batch)
        images = batch * side * side * 3 * 2  # uint8 LR (upsampled) in, uint8 SR out
        lines.append(report(case, variant, {"sr": analytic}, {"sr": sr_xla(tcfg, ae_cfg, tokens, side, batch)},
                            weights + images, {"batch": batch, "resolution": side, "dtype": dtype}))
    if "sr_tiled" in chosen:
        side = 128 if args.tiny else 2048
        lines.append(report("sr_tiled", variant, {"sr": sr_tiled_analytic(tcfg, ae_cfg, tokens, side)}, {},
                            weights + side * side * 3 * 2, {"batch": 1, "resolution": side, "dtype": dtype}))
    for case, module in (("teacher_fm", teacher_fm), ("student_isc", student_isc), ("student_gan", student_gan),
                         ("student_reward", student_reward)):
        if case not in chosen:
            continue
        config = module.get_config(variant)
        stage, optimizer, state = harness.abstract_stage(config)
        side, batch = config.data.degradation.crop_size, config.batch_size
        analytic = step_passes(case, config, stage, batch, side)
        trainable = tree_bytes(stage.trainable)
        frozen = tree_bytes({k: v for k, v in stage.frozen.items() if k != "null"})
        # Frozen weights read; trainable fp32 weights, AdamW's two moments and the gradient read and written.
        moved = frozen + 8 * trainable + batch * side * side * 3 * (2 + 1 / 16)
        lines.append(report(case, variant, analytic, step_xla(case, config, stage, optimizer, state, batch, side),
                            moved, {"batch": batch, "resolution": side, "dtype": config.model.dtype,
                                    "remat": config.model.remat_policy,
                                    "trainable_params": partition.count(stage.trainable)},
                            None if case == "teacher_fm" else config.isc.p_boundary))
    worst = max((line["worst_ratio"] for line in lines if line["worst_ratio"]), default=None)
    print(json.dumps({"name": "flop_audit", "value": worst, "unit": "largest XLA / analytic FLOPs",
                      "within_limit": worst is None or worst <= 1 + EXCESS_LIMIT, "cases": [line["case"] for line in lines],
                      "accelerators": harness.ACCELERATORS, "variant": variant, "speedup": None,
                      **harness.environment()}))


if __name__ == "__main__":
    main()
