"""MM-DiT forward on CPU: jitted Flax against diffusers' torch `SD3Transformer2DModel`, same weights and inputs.

A mid-size SD3 configuration (8 blocks, 4 dual, width 512), fp32, batch 2, 32x32 latents (256 image tokens) and
154 text tokens. Both run in this process with the same number of threads; times are medians over repeats after
warm-up (compilation excluded). The last line is one JSON object; speedup = torch time / JAX time.

  python benchmarks/forward_cpu.py [--repeats 10]
"""

import argparse
import json
import os
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.harness import median_seconds  # noqa: E402
from smfsr_jax.convert import tensors  # noqa: E402
from smfsr_jax.convert.transformer import load_transformer  # noqa: E402
from smfsr_jax.models import mmdit  # noqa: E402

CONFIG = dict(sample_size=32, patch_size=2, in_channels=16, num_layers=8, attention_head_dim=64, num_attention_heads=8,
              joint_attention_dim=1024, caption_projection_dim=512, pooled_projection_dim=256, out_channels=16,
              pos_embed_max_size=64, dual_attention_layers=(0, 1, 2, 3), qk_norm="rms_norm")
BATCH, LATENT, TEXT_TOKENS = 2, 32, 154


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    import torch
    from diffusers import SD3Transformer2DModel
    threads = os.cpu_count()
    torch.set_num_threads(threads)

    torch.manual_seed(0)
    model = SD3Transformer2DModel(**CONFIG).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(BATCH, 16, LATENT, LATENT)).astype(np.float32)
    ctx = rng.normal(size=(BATCH, TEXT_TOKENS, CONFIG["joint_attention_dim"])).astype(np.float32)
    pooled = rng.normal(size=(BATCH, CONFIG["pooled_projection_dim"])).astype(np.float32)
    t = np.array([0.7, 0.3], np.float32)

    with tempfile.TemporaryDirectory() as tmp:
        tensors.write_safetensors(os.path.join(tmp, "diffusion_pytorch_model.safetensors"),
                                  {k: v.numpy() for k, v in model.state_dict().items()})
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(CONFIG, f)
        cfg, params = load_transformer(tmp)
    params = jax.device_put(params)
    forward = jax.jit(lambda p, z, c, y, t: mmdit.MMDiT(cfg).apply({"params": p}, z, context=c, pooled=y, t=t))
    z = jax.device_put(x.transpose(0, 2, 3, 1))
    ours = lambda: forward(params, z, ctx, pooled, t).block_until_ready()  # noqa: E731

    tx, tc, tp, tt = (torch.from_numpy(a) for a in (x, ctx, pooled, t * 1000))

    def reference():
        with torch.no_grad():
            return model(hidden_states=tx, encoder_hidden_states=tc, pooled_projections=tp, timestep=tt,
                         return_dict=False)[0]

    diff = float(np.abs(np.asarray(ours()).transpose(0, 3, 1, 2) - reference().numpy()).max())
    jax_s, _ = median_seconds(ours, args.repeats, warmup=1)
    torch_s, _ = median_seconds(reference, args.repeats, warmup=1)
    print(f"jax {jax_s * 1e3:.1f} ms, torch eager {torch_s * 1e3:.1f} ms, max |diff| {diff:.2e}")
    print(json.dumps({"name": "mmdit_forward_cpu", "value": round(jax_s * 1e3, 2), "unit": "ms",
                      "reference_ms": round(torch_s * 1e3, 2), "speedup": round(torch_s / jax_s, 3),
                      "config": {**CONFIG, "dual_attention_layers": list(CONFIG["dual_attention_layers"]),
                                 "batch": BATCH, "latent": LATENT, "text_tokens": TEXT_TOKENS, "dtype": "float32"},
                      "threads": threads, "max_abs_diff": diff, "hardware": f"CPU x{threads}",
                      "jax": jax.__version__, "torch": torch.__version__}))


if __name__ == "__main__":
    main()
