"""Scaled dot-product attention with a selectable implementation (`xla` | `cudnn` | None = let JAX pick)."""

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = (None, "xla", "cudnn")


def dot_product_attention(q, k, v, *, implementation=None, bias=None, mask=None, scale=None):
    """q, k, v: (B, T, heads, head_dim); scale defaults to 1/sqrt(head_dim). Softmax runs in fp32."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    if implementation == "cudnn" and q.dtype not in (jnp.bfloat16, jnp.float16):
        # cuDNN's fused kernel takes half precision only; fp32 (parity) runs take the XLA path.
        implementation = "xla"
    return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale, implementation=implementation)
