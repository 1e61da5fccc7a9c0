"""The MM-DiT's joint attention alone: the XLA path against the platform's fused kernel (cuDNN on a GPU, splash on a
TPU), forward and forward + backward, at the SD3.5-M shape of a 512² image (154 text + 1024 image + 1024 LR tokens
in training, 333 + 2048 at SR; 24 heads of 64), bf16.

  python benchmarks/attention_speed.py                   # batch 1 and 16, T = 2381 (the SR sequence)
  python benchmarks/attention_speed.py --tiny            # CPU check of the script (only the XLA path runs here)

Each implementation is jitted and timed (median of --repeats after 2 warm-up calls, blocking on the result);
FLOPs are the products' 4·B·H·T²·D forward (scores and weighted sums), three times that with the backward.
An implementation the platform cannot run (cuDNN without a GPU) falls back to XLA and is reported as such and
not timed twice. The last line is one JSON object: value = XLA time / fused time, forward + backward, at the
largest batch (speedup, the same), or null where no fused kernel ran.
"""

import argparse
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks import harness  # noqa: E402
from smfsr_jax.models import attention  # noqa: E402

SR_TOKENS = harness.TEXT_TOKENS + 2 * 1024  # 512² SR: 64² latents, 2x2 patches, image + LR tokens
HEADS, HEAD_DIM = 24, 64


def timed(implementation: str, batch: int, length: int, heads: int, head_dim: int, repeats: int) -> dict:
    shape = (batch, length, heads, head_dim)
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    q, k, v = (jax.random.normal(key, shape, jnp.bfloat16) for key in keys)

    def out(q, k, v):
        return attention.dot_product_attention(q, k, v, implementation=implementation)

    forward = jax.jit(out)
    backward = jax.jit(jax.grad(lambda q, k, v: out(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2)))
    flops = 4.0 * batch * heads * length * length * head_dim
    result = {"implementation": implementation, "batch": batch, "tokens": length}
    for name, fn, count in (("forward", forward, flops), ("forward_backward", backward, 3 * flops)):
        seconds, _ = harness.median_seconds(lambda: jax.block_until_ready(fn(q, k, v)), repeats)
        result[f"{name}_ms"] = round(1e3 * seconds, 3)
        result[f"{name}_tflops_per_s"] = round(count / seconds / 1e12, 2)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="small shapes (CPU check of the script)")
    parser.add_argument("--batches", default=None, help="comma list (default 1,16; tiny 1,2)")
    parser.add_argument("--tokens", type=int, default=None, help=f"sequence length (default {SR_TOKENS}; tiny 200)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls (default 20; tiny 3)")
    args = parser.parse_args()
    batches = [int(b) for b in (args.batches or ("1,2" if args.tiny else "1,16")).split(",")]
    length = args.tokens or (200 if args.tiny else SR_TOKENS)
    heads, head_dim = (2, 64) if args.tiny else (HEADS, HEAD_DIM)
    repeats = args.repeats or (3 if args.tiny else 20)
    fused = attention.fused_implementation() or "xla"
    runs = {"xla": "xla", fused: attention.resolve_implementation(fused, jnp.bfloat16)}
    results = []
    for batch in batches:
        for name, resolved in runs.items():
            if name != "xla" and resolved == "xla":
                continue  # falls back to the XLA path here: nothing new to time
            result = timed(name, batch, length, heads, head_dim, repeats)
            print(json.dumps(result), flush=True)
            results.append(result)
    largest = [r for r in results if r["batch"] == batches[-1]]
    xla = next(r for r in largest if r["implementation"] == "xla")
    other = next((r for r in largest if r["implementation"] != "xla"), None)
    speedup = round(xla["forward_backward_ms"] / other["forward_backward_ms"], 2) if other else None
    print(json.dumps({"name": "attention_speed", "value": speedup, "unit": "x (XLA time / fused time, fwd+bwd)",
                      "speedup": speedup, "fused": fused if other else None, "tokens": length, "heads": heads,
                      "head_dim": head_dim, "dtype": "bfloat16", "batches": batches, "results": results,
                      **harness.environment()}))


if __name__ == "__main__":
    main()
