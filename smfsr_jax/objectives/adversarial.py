"""Hinge GAN losses (SMFSR Eq. 17-18), applied per logit (every token of every head), then averaged."""

import jax.numpy as jnp


def hinge_d_loss(real_logits, fake_logits):
    """E[max(0, 1 - D(x_h))] + E[max(0, 1 + D(x_hat))]; 2.0 when every logit is 0."""
    return jnp.mean(jnp.maximum(0.0, 1.0 - real_logits)) + jnp.mean(jnp.maximum(0.0, 1.0 + fake_logits))


def hinge_g_loss(fake_logits):
    """-E[D(x_hat)]."""
    return -jnp.mean(fake_logits)
