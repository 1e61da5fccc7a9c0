"""The two formulas every sampler and loss shares, written once.

Flow times run from 1 (noise) to 0 (data); a student u(z, r, t) is the average velocity over [r, t], so one
step from noise is z_0 = z_1 − u(z_1, 0, 1).
"""

import jax.numpy as jnp


def cfg_mix(v_uncond, v_cond, scale):
    """Classifier-free guidance: v_u + w·(v_c − v_u)."""
    return v_uncond + scale * (v_cond - v_uncond)


def one_step(u_fn, noise):
    """z_0 = ε − u(ε, r = 0, t = 1), with `u_fn(z, r, t)` taking per-sample (B,) times."""
    batch = noise.shape[0]
    return noise - u_fn(noise, jnp.zeros((batch,), jnp.float32), jnp.ones((batch,), jnp.float32))
