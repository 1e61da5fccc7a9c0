"""Variational score distillation (SMFSR Eq. 15) and the regularizer's flow-matching loss (Eq. 16).

VSD: t ~ U(0.02, 0.98), z_t = (1 - t) sg(z_hat) + t eps;
    x0_tea = z_t - t v_teacher^CFG(z_t, t),   x0_reg = z_t - t v_reg(z_t, t)   (both under stop-gradient);
    w = max(mean_{C,H,W} |z_hat - x0_tea|, 1e-6) per sample;  g = (x0_reg - x0_tea) / w;
    L = 1/2 mean((z_hat - sg(z_hat - g))^2),  so that dL/dz_hat = g / numel.
Since x0_reg - x0_tea = t (v_tea - v_reg), descent moves z_hat toward the teacher's x0 and away from the
regularizer's: Eq. 15 with omega(t) = t / w, the (1 - t) of dz_t/dtheta absorbed as DMD/OSEDiff do.
"""

from typing import Callable

import jax
import jax.numpy as jnp

from smfsr_jax.objectives.flow_matching import batch_broadcast, interpolate

VelocityFn = Callable[[jax.Array, jax.Array], jax.Array]


def sample_times(rng, batch: int, t_min: float = 0.02, t_max: float = 0.98):
    return jax.random.uniform(rng, (batch,), minval=t_min, maxval=t_max)


def vsd_gradient(z_hat, teacher_fn: VelocityFn, regularizer_fn: VelocityFn, rng, *, t_min=0.02, t_max=0.98):
    """g = (x0_reg - x0_tea) / w, the normalised VSD direction (stop-gradient throughout)."""
    rng_t, rng_noise = jax.random.split(rng)
    z_hat = jax.lax.stop_gradient(z_hat)
    t = sample_times(rng_t, z_hat.shape[0], t_min, t_max)
    z_t = interpolate(z_hat, jax.random.normal(rng_noise, z_hat.shape, z_hat.dtype), t)
    x0_teacher = z_t - batch_broadcast(t, z_t) * teacher_fn(z_t, t)
    x0_regularizer = z_t - batch_broadcast(t, z_t) * regularizer_fn(z_t, t)
    weight = jnp.maximum(jnp.abs(z_hat - x0_teacher).mean(axis=tuple(range(1, z_hat.ndim)), keepdims=True), 1e-6)
    return jax.lax.stop_gradient((x0_regularizer - x0_teacher) / weight)


def vsd_loss(z_hat, teacher_fn: VelocityFn, regularizer_fn: VelocityFn, rng, *, t_min=0.02, t_max=0.98):
    """(loss, metrics); the gradient w.r.t. z_hat is vsd_gradient(...) / z_hat.size."""
    g = vsd_gradient(z_hat, teacher_fn, regularizer_fn, rng, t_min=t_min, t_max=t_max)
    target = jax.lax.stop_gradient(z_hat - g)
    loss = 0.5 * jnp.mean(jnp.square(z_hat - target))
    return loss, {"vsd_loss": loss, "vsd_grad_rms": jnp.sqrt(jnp.mean(jnp.square(g)))}


def regularizer_loss(regularizer_fn: VelocityFn, z_hat, rng, *, t_min=0.02, t_max=0.98):
    """Eq. 16: flow matching of the regularizer on the detached generated latents, fresh t and noise."""
    rng_t, rng_noise = jax.random.split(rng)
    z_hat = jax.lax.stop_gradient(z_hat)
    t = sample_times(rng_t, z_hat.shape[0], t_min, t_max)
    noise = jax.random.normal(rng_noise, z_hat.shape, z_hat.dtype)
    v = regularizer_fn(interpolate(z_hat, noise, t), t)
    loss = jnp.mean(jnp.square(v - (noise - z_hat)))
    return loss, {"regularizer_loss": loss}
