"""Shared pieces of the benchmarks: random weights made on the device for the stages' abstract trees,
FLOP counting with XLA's cost analysis, timing and the hardware line.

The scripts put the repository root on sys.path and import this module as `benchmarks.harness`.
"""

import contextlib
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from smfsr_jax.models import text
from smfsr_jax.training import partition, stages
from smfsr_jax.training import state as state_lib
from smfsr_jax.weights import pretrained

# SR's prompt length: 77 CLIP + 256 T5 tokens, as the released models are sampled (training uses 77 + 77).
TEXT_TOKENS = text.CLIP_MAX_LENGTH + pretrained.NULL_T5_LENGTH


def abstract_stage(config, use_ema: bool = False):
    """(stage, optimizer, abstract train state) of a stage config as shapes: nothing is loaded or allocated."""
    stage = stages.build_stage(config, abstract=True)
    optimizer = state_lib.make_optimizer(config.optimizer, stage.parts)
    state = jax.eval_shape(lambda p, m: state_lib.create_state(p, optimizer, use_ema, m), stage.trainable,
                           stage.model_state)
    return stage, optimizer, state


# Per device: dense bf16 peak and HBM bandwidth from the vendors' pages (NVIDIA's pages list bf16 with 2:4 sparsity,
# halved here), and the substring of jax's device_kind that names the device.
ACCELERATORS = {
    "H100 SXM": {"bf16_tflops": 989.5, "hbm_tb_s": 3.35, "device_kind": "H100",
                 "source": "https://www.nvidia.com/en-us/data-center/h100/"},
    "H200": {"bf16_tflops": 989.5, "hbm_tb_s": 4.8, "device_kind": "H200",
             "source": "https://www.nvidia.com/en-us/data-center/h200/"},
    "TPU v5p": {"bf16_tflops": 459.0, "hbm_tb_s": 2.765, "device_kind": "TPU v5p",
                "source": "https://cloud.google.com/tpu/docs/v5p"},
    "TPU v6e": {"bf16_tflops": 918.0, "hbm_tb_s": 1.638, "device_kind": "TPU v6 lite",
                "source": "https://cloud.google.com/tpu/docs/v6e"},
}


def peak_flops(device_kind: str) -> float | None:
    """Dense bf16 FLOP/s of a device named like jax's device_kind, None when not in ACCELERATORS."""
    return next((a["bf16_tflops"] * 1e12 for a in ACCELERATORS.values() if a["device_kind"] in device_kind), None)


def train_batch(null: dict, batch: int, side: int) -> dict:
    """A training batch as shapes: uint8 HR, LR (x4 smaller) and bicubic-upsampled LR crops plus caption
    embeddings shaped like the stage's NULL embeddings (`stage.frozen["null"]`)."""
    prompt, pooled = null["prompt_embeds"].shape, null["pooled_prompt_embeds"].shape
    return {"hr": jax.ShapeDtypeStruct((batch, side, side, 3), jnp.uint8),
            "lr": jax.ShapeDtypeStruct((batch, side // 4, side // 4, 3), jnp.uint8),
            "lr_up": jax.ShapeDtypeStruct((batch, side, side, 3), jnp.uint8),
            "prompt_embeds": jax.ShapeDtypeStruct((batch, *prompt), jnp.float32),
            "pooled_prompt_embeds": jax.ShapeDtypeStruct((batch, *pooled), jnp.float32)}


# ---------------------------------------------------------------------------------------------
# Random values on the device.

def _leaf_name(path) -> str:
    return partition._key_name(path[-1]) if path else ""


def random_tree(tree, seed: int = 0, std: float = 0.02, pool: int = 1 << 26):
    """Device arrays shaped like `tree` (arrays or ShapeDtypeStructs), made by one jitted function (no host copy).

    Floats ~ N(0, std²), except norm scales (1) and biases (0), so that deep random networks stay finite;
    integers (images) uniform over 0..255. Values come from one draw of at most `pool` numbers per kind and
    dtype, read cyclically: a few RNG kernels compile in seconds where one per leaf takes minutes, and memory
    stays bounded. Good for speed measurements, not for statistics.
    """
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    kinds, sizes = [], {}
    for path, leaf in leaves:
        dtype, name = jnp.dtype(leaf.dtype), _leaf_name(path)
        kind = "int" if jnp.issubdtype(dtype, jnp.integer) else name if name in ("scale", "bias") else "normal"
        kinds.append(kind)
        if kind in ("int", "normal"):
            sizes[(kind, dtype)] = sizes.get((kind, dtype), 0) + int(np.prod(leaf.shape))

    def make(key):
        pools, offsets, out = {}, {}, []
        for i, ((kind, dtype), total) in enumerate(sorted(sizes.items(), key=str)):
            k, size = jax.random.fold_in(key, i), min(total, pool)
            draw = (jax.random.randint(k, (size,), 0, 256, jnp.int32) if kind == "int"
                    else std * jax.random.normal(k, (size,), jnp.float32)).astype(dtype)
            pools[(kind, dtype)], offsets[(kind, dtype)] = jnp.concatenate([draw, draw]), 0
        for (_, leaf), kind in zip(leaves, kinds):
            dtype, count = jnp.dtype(leaf.dtype), int(np.prod(leaf.shape))
            if kind == "scale":
                out.append(jnp.ones(leaf.shape, dtype))
            elif kind == "bias":
                out.append(jnp.zeros(leaf.shape, dtype))
            else:
                values, start = pools[(kind, dtype)], offsets[(kind, dtype)]
                size = values.shape[0] // 2
                chunk = values[start % size:start % size + min(count, size)]
                out.append((chunk if count <= size else jnp.resize(chunk, (count,))).reshape(leaf.shape))
                offsets[(kind, dtype)] = start + count
        return jax.tree_util.tree_unflatten(treedef, out)

    return jax.jit(make)(jax.random.PRNGKey(seed))


# ---------------------------------------------------------------------------------------------
# FLOPs.

@contextlib.contextmanager
def flop_counting(branch: bool | None = None):
    """Make XLA's cost analysis count every executed FLOP once.

    HloCostAnalysis counts a while-loop body once whatever its trip count (so a 23-block `nn.scan` counts as
    one block) and a conditional as its costlier branch. Inside this context `nn.scan` unrolls fully and, with
    `branch` given, `jax.lax.cond` runs only that branch (True: the first function). Use it only to lower a
    copy of a step for counting, never for the step that is timed, and jit a fresh function inside it
    (`jax.jit(lambda *a: f(*a))`): jit reuses an earlier trace of the same function, patches unseen.
    """
    scan, cond = nn.scan, jax.lax.cond

    def unrolled_scan(target, *args, **kwargs):
        return scan(target, *args, **{**kwargs, "unroll": kwargs.get("length") or 1})

    def one_branch(pred, true_fun, false_fun, *operands, **kwargs):
        return (true_fun if branch else false_fun)(*operands)

    nn.scan = unrolled_scan
    if branch is not None:
        jax.lax.cond = one_branch
    try:
        yield
    finally:
        nn.scan, jax.lax.cond = scan, cond


def cost_flops(lowered_or_compiled) -> float:
    """The 'flops' entry of XLA's cost analysis (a dict, or a one-element list in older jax)."""
    cost = lowered_or_compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0]
    return float(cost.get("flops", 0.0)) if cost else 0.0


# ---------------------------------------------------------------------------------------------
# Timing and environment.

def median_seconds(fn, repeats: int, warmup: int = 2) -> tuple[float, list[float]]:
    """(median, all) wall seconds of fn() after `warmup` untimed calls; fn must block on its result."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), times


def hardware() -> str:
    devices = jax.devices()
    if devices[0].platform == "cpu":
        return f"CPU x{os.cpu_count()} cores"
    return f"{len(devices)}x {devices[0].device_kind}"


def device_bytes_limit() -> int | None:
    """Usable memory of the first device (None on CPU, where the stats are absent)."""
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("bytes_limit")


def environment() -> dict:
    return {"hardware": hardware(), "backend": jax.default_backend(), "jax": jax.__version__,
            "date": time.strftime("%Y-%m-%d")}
