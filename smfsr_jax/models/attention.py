"""Scaled dot-product attention with a selectable implementation: `xla`, `cudnn` (cuDNN's fused kernel on a GPU),
`splash` (Pallas splash attention on a TPU), or None (let JAX pick).

A fused kernel runs only where it can: `cudnn` on a GPU in half precision, `splash` on a TPU; elsewhere both take
the XLA path, so one config runs on every host. The platform is the host's backend unless `target` names the
one a function is being lowered for (`jax.export` for TPU from a CPU host), and `target(..., interpret=True)`
runs the splash kernel in Pallas' interpreter on any host, which is how its numerics are tested.
"""

import contextlib
import contextvars

import jax
import jax.numpy as jnp
import numpy as np

IMPLEMENTATIONS = (None, "xla", "cudnn", "splash")
# Mosaic tiles the last two axes by (8 sublanes, 128 lanes): sequence blocks and the head dimension are padded to
# multiples of 128 (zeros in q, k and v change no score and no output).
LANES = 128
SPLASH_BLOCKS = (512, 256, 128)

_target = contextvars.ContextVar("attention_target", default=(None, False))
_batch_mesh = contextvars.ContextVar("attention_batch_mesh", default=None)


@contextlib.contextmanager
def target(platform: str, interpret: bool = False):
    """Trace attention for `platform` ("cpu", "cuda"/"gpu", "tpu") instead of the host's backend. A jitted function
    caches its first trace: build a fresh one inside the context."""
    token = _target.set(("gpu" if platform == "cuda" else platform, interpret))
    try:
        yield
    finally:
        _target.reset(token)


@contextlib.contextmanager
def batch_mesh(mesh):
    """Trace with the batch split over every axis of `mesh` (as the train step's batch is): a Mosaic kernel is not
    partitioned by XLA, so splash attention runs per device under shard_map."""
    token = _batch_mesh.set(mesh)
    try:
        yield
    finally:
        _batch_mesh.reset(token)


def _platform() -> str:
    return _target.get()[0] or jax.default_backend()


def resolve_implementation(implementation, dtype):
    """The path that runs: `cudnn` on a GPU in half precision, `splash` on a TPU (or interpreted), else `xla`."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    platform = _platform()
    if implementation == "cudnn" and (jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16) or platform != "gpu"):
        return "xla"  # fp32 (parity runs) and CPU/TPU hosts: the same config runs everywhere
    if implementation == "splash" and platform != "tpu" and not _target.get()[1]:
        return "xla"
    return implementation


def with_platform_default(implementation):
    """The MM-DiT's attention: `implementation`, or where it is None splash on a TPU and the XLA path elsewhere.
    cuDNN's fused kernel stays opt-in on a GPU until a GPU has measured it (it has open failures under CUDA 13)."""
    if implementation is not None:
        return implementation
    return "splash" if _platform() == "tpu" else "xla"


def fused_implementation():
    """The platform's fused kernel, cuDNN on a GPU and splash on a TPU (None elsewhere): what the speed benchmarks
    time unless told otherwise."""
    return {"gpu": "cudnn", "tpu": "splash"}.get(_platform())


def traced_implementation(implementation, dtype) -> str:
    """What a trace of the MM-DiT's attention runs for `implementation` (None: the platform's default)."""
    return resolve_implementation(with_platform_default(implementation), dtype)


def dot_product_attention(q, k, v, *, implementation=None, bias=None, mask=None, scale=None):
    """q, k, v: (B, T, heads, head_dim); scale defaults to 1/sqrt(head_dim). Softmax runs in fp32."""
    implementation = resolve_implementation(implementation, q.dtype)
    if implementation == "splash":
        if bias is not None or mask is not None:
            raise ValueError("splash attention takes no bias or mask: use implementation='xla'")
        return splash_attention(q, k, v, scale=scale, interpret=_target.get()[1])
    return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale, implementation=implementation)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def splash_block(length: int) -> int:
    """The largest of 512, 256, 128 that divides the sequence padded to a multiple of 128."""
    padded = _round_up(length, LANES)
    return next(block for block in SPLASH_BLOCKS if padded % block == 0)


def _splash_kernel(length: int, heads: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel_lib
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib
    padded, block = _round_up(length, LANES), splash_block(length)
    keys_present = np.zeros((padded, padded), bool)
    keys_present[:, :length] = True  # padded keys get no weight; padded queries are dropped afterwards
    mask = mask_lib.MultiHeadMask([mask_lib.NumpyMask(keys_present)] * heads)
    sizes = kernel_lib.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                                  block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    return kernel_lib.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def splash_attention(q, k, v, *, scale=None, interpret: bool = False):
    """Unmasked attention through Pallas splash attention, (B, T, heads, head_dim) in and out. T is padded to a
    multiple of 128 (the joint text + image + LR sequence rarely is one) with the padded keys masked out, and
    head_dim to a multiple of 128 with zeros."""
    batch, length, heads, head_dim = q.shape
    scale = head_dim ** -0.5 if scale is None else scale
    padded, padded_dim = _round_up(length, LANES), _round_up(head_dim, LANES)

    kernel = jax.vmap(_splash_kernel(length, heads, interpret))  # built per trace: it holds that trace's arrays
    mesh, padded_batch = _batch_mesh.get(), batch
    if mesh is not None and mesh.size > 1:
        # A batch that does not fill the mesh (a 4-image preview on 8 devices) is padded with zeros to a multiple of
        # it, so every device runs whole examples.
        padded_batch = _round_up(batch, mesh.size)
        spec = jax.sharding.PartitionSpec(tuple(mesh.axis_names))
        kernel = jax.shard_map(kernel, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)

    def to_kernel(x):  # (B, T, H, D) -> (B', H, T', D')
        x = jnp.pad(x, ((0, padded_batch - batch), (0, padded - length), (0, 0), (0, padded_dim - head_dim)))
        return x.transpose(0, 2, 1, 3)

    out = kernel(to_kernel(q * jnp.asarray(scale, q.dtype)), to_kernel(k), to_kernel(v))
    return out.transpose(0, 2, 1, 3)[:batch, :length, :, :head_dim].astype(q.dtype)
