"""Scaled dot-product attention with a selectable implementation (`xla` | `cudnn` | None = let JAX pick)."""

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = (None, "xla", "cudnn")


def resolve_implementation(implementation, dtype):
    """`cudnn` where cuDNN's fused kernel can run (a GPU, half precision), else the XLA path."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    if implementation == "cudnn" and (jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16)
                                      or jax.default_backend() != "gpu"):
        # fp32 (parity runs) and CPU/TPU hosts: the same config runs everywhere.
        return "xla"
    return implementation


def dot_product_attention(q, k, v, *, implementation=None, bias=None, mask=None, scale=None):
    """q, k, v: (B, T, heads, head_dim); scale defaults to 1/sqrt(head_dim). Softmax runs in fp32."""
    implementation = resolve_implementation(implementation, q.dtype)
    return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale, implementation=implementation)
